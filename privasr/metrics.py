"""Word and character error rates (jiwer), corpus-level and per utterance.

``error rate = (S + D + I) / N`` with ``N`` the number of reference units
(words, or characters including single spaces). Texts are compared after
collapsing runs of whitespace and stripping the ends; nothing else is
normalized (case and punctuation are the caller's business). Rates are
fractions (``0.05`` = 5 %); :meth:`ErrorCounts.summary` prints the Kaldi /
SpeechBrain line ``%WER 5.00 [ 2 / 40, 1 ins, 0 del, 1 sub ]``.

An empty reference has ``N = 0``: every hypothesis unit is an insertion and
the per-utterance rate is ``errors / max(N, 1)`` (jiwer's convention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import jiwer

__all__ = ["ErrorCounts", "normalize_whitespace", "word_errors", "char_errors",
           "wer", "cer", "utterance_wer", "utterance_cer", "per_utterance_wer",
           "per_utterance_cer"]

_UNITS = ("word", "char")


@dataclass(frozen=True)
class ErrorCounts:
    """Edit-distance counts summed over one or more utterances."""

    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    reference_length: int = 0

    @property
    def errors(self) -> int:
        """``S + D + I``."""
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float:
        """``errors / max(N, 1)`` as a fraction."""
        return self.errors / max(self.reference_length, 1)

    def __add__(self, other: "ErrorCounts") -> "ErrorCounts":
        return ErrorCounts(self.substitutions + other.substitutions,
                           self.deletions + other.deletions,
                           self.insertions + other.insertions,
                           self.reference_length + other.reference_length)

    def summary(self, name: str = "WER") -> str:
        """``%WER 12.50 [ 3 / 24, 1 ins, 1 del, 1 sub ]``."""
        return (f"%{name} {100 * self.rate:.2f} [ {self.errors} / {self.reference_length}, "
                f"{self.insertions} ins, {self.deletions} del, {self.substitutions} sub ]")


def normalize_whitespace(text: str) -> str:
    """Collapse whitespace runs to one space and strip the ends."""
    return " ".join(text.split())


def _units(text: str, unit: str) -> int:
    """Number of words or characters of an already normalized text."""
    return len(text.split()) if unit == "word" else len(text)


def _pair_errors(reference: str, hypothesis: str, unit: str) -> ErrorCounts:
    """Counts for one (reference, hypothesis) pair."""
    reference, hypothesis = normalize_whitespace(reference), normalize_whitespace(hypothesis)
    if not reference:
        return ErrorCounts(insertions=_units(hypothesis, unit))
    process = jiwer.process_words if unit == "word" else jiwer.process_characters
    out = process(reference, hypothesis)
    return ErrorCounts(out.substitutions, out.deletions, out.insertions,
                       _units(reference, unit))


def _check_pairs(references: Sequence[str], hypotheses: Sequence[str]) -> None:
    """Raise ``ValueError`` unless given two equally long lists of strings."""
    if isinstance(references, str) or isinstance(hypotheses, str):
        raise ValueError("pass lists of strings (use utterance_wer/cer for one pair)")
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")


def _corpus_errors(references: Sequence[str], hypotheses: Sequence[str], unit: str
                   ) -> ErrorCounts:
    """Counts summed over aligned lists of references and hypotheses."""
    if unit not in _UNITS:
        raise ValueError(f"unit must be one of {_UNITS}, got {unit!r}")
    _check_pairs(references, hypotheses)
    total = ErrorCounts()
    for reference, hypothesis in zip(references, hypotheses):
        total = total + _pair_errors(reference, hypothesis, unit)
    return total


def word_errors(references: Sequence[str], hypotheses: Sequence[str]) -> ErrorCounts:
    """Corpus word-level counts."""
    return _corpus_errors(references, hypotheses, "word")


def char_errors(references: Sequence[str], hypotheses: Sequence[str]) -> ErrorCounts:
    """Corpus character-level counts (spaces count as characters)."""
    return _corpus_errors(references, hypotheses, "char")


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER: total word errors / total reference words (fraction)."""
    counts = word_errors(references, hypotheses)
    if counts.reference_length == 0:
        raise ValueError("corpus WER is undefined: all references are empty")
    return counts.rate


def cer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus CER: total character errors / total reference characters (fraction)."""
    counts = char_errors(references, hypotheses)
    if counts.reference_length == 0:
        raise ValueError("corpus CER is undefined: all references are empty")
    return counts.rate


def utterance_wer(reference: str, hypothesis: str) -> float:
    """WER of one utterance (fraction)."""
    return _pair_errors(reference, hypothesis, "word").rate


def utterance_cer(reference: str, hypothesis: str) -> float:
    """CER of one utterance (fraction), e.g. to rank canaries for exposure."""
    return _pair_errors(reference, hypothesis, "char").rate


def per_utterance_wer(references: Sequence[str], hypotheses: Sequence[str]) -> List[float]:
    """WER of each utterance."""
    _check_pairs(references, hypotheses)
    return [utterance_wer(r, h) for r, h in zip(references, hypotheses)]


def per_utterance_cer(references: Sequence[str], hypotheses: Sequence[str]) -> List[float]:
    """CER of each utterance."""
    _check_pairs(references, hypotheses)
    return [utterance_cer(r, h) for r, h in zip(references, hypotheses)]
