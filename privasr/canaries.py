"""Secret Sharer canaries for ASR (Carlini et al. 2019; Wang et al. 2024; paper section 2.3).

A *canary* is an out-of-distribution utterance inserted ``k`` times into the training set:
its transcript is ``length`` (default 7) words drawn i.i.d. uniformly from a vocabulary
(by default the training lexicon), spoken by TTS and sped up 4x. A *holdout* set drawn from
the same distribution is never inserted; exposure (:mod:`privasr.exposure`) ranks each
canary's error among the holdout errors.

Defaults: 20 canaries for each insertion count in (1, 2, 4, 8, 16) and 1,000 holdout
utterances. All transcripts are distinct, so canaries and holdout are disjoint, and none
equals a training transcript.

Speed and CTC. A character CTC model with a 40 ms frame rate needs at least one frame per
character, plus one blank between repeated letters ("LL" needs three frames). espeak-ng at
its usual 160-175 wpm, sped up 4x, gives ~25 ms per character, so the loss is infinite.
The default voice therefore speaks at espeak-ng's slowest rate (80 wpm) with a 160 ms word
gap (``-g 16``) before the 4x tempo, which gives ~46-66 ms per character (median ~54;
characters include spaces). :func:`char_duration_stats` reports this for every set made.

Training-manifest rows of an inserted canary repeat its audio under the IDs
``<canary id>_r1 .. _r<k>``; :func:`canary_id_of` maps them back.
"""
from __future__ import annotations

import hashlib
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from privasr.data import claim_dir, is_done, mark_done
from privasr.data.manifest import Utterance, lexicon, read_lexicon, read_manifest, write_manifest
from privasr.tts import SynthesisJob, Voice, synthesize_many

__all__ = [
    "Canary", "DEFAULT_COUNTS", "DEFAULT_VOICE", "MIN_MS_PER_CHAR",
    "draw_transcripts", "plan_canaries", "synthesize_canaries", "insert_canaries",
    "repeat_id", "canary_id_of", "read_canaries", "char_duration_stats", "format_char_stats", "make_canaries",
]

log = logging.getLogger(__name__)

DEFAULT_COUNTS = (1, 2, 4, 8, 16)
DEFAULT_VOICE = Voice("espeak-ng", "en-us", rate=80, word_gap=16)
#: One output frame of a 10 ms front end subsampled 4x.
MIN_MS_PER_CHAR = 40.0
_REPEAT = re.compile(r"^(?P<canary>.+)_r(?P<repeat>[1-9][0-9]*)$")


@dataclass(frozen=True)
class Canary:
    """A planned canary (``insertions >= 1``) or holdout utterance (``insertions == 0``)."""

    id: str
    text: str
    insertions: int


def draw_transcripts(
    vocabulary: Sequence[str], num: int, length: int = 7, seed: int = 0, exclude: Iterable[str] = ()
) -> list[str]:
    """``num`` distinct upper-case transcripts of ``length`` words drawn uniformly (with
    replacement) from ``vocabulary`` with ``random.Random(seed)``; none is in ``exclude``.
    """
    words = sorted({w.upper() for w in vocabulary})
    if num < 0 or length < 1:
        raise ValueError(f"need num >= 0 and length >= 1, got num={num}, length={length}")
    excluded = {" ".join(t.upper().split()) for t in exclude}
    vocab = set(words)
    reachable = sum(1 for t in excluded if len(t.split()) == length and set(t.split()) <= vocab)
    if len(words) ** length < num + reachable:
        raise ValueError(f"a vocabulary of {len(words)} words cannot give {num} distinct {length}-word transcripts")
    rng, drawn, seen = random.Random(seed), [], set(excluded)
    while len(drawn) < num:
        text = " ".join(rng.choice(words) for _ in range(length))
        if text not in seen:
            seen.add(text)
            drawn.append(text)
    return drawn


def _id_width(count: int, minimum: int) -> int:
    return max(minimum, len(str(max(count - 1, 0))))


def plan_canaries(
    vocabulary: Sequence[str],
    counts: Sequence[int] = DEFAULT_COUNTS,
    per_count: int = 20,
    holdout: int = 1000,
    length: int = 7,
    seed: int = 0,
    exclude: Iterable[str] = (),
) -> tuple[list[Canary], list[Canary]]:
    """Canaries (``per_count`` for each insertion count, in the order of ``counts``) and holdout.

    IDs are ``canary_0000``... and ``holdout_00000``...; transcripts are all distinct.
    """
    if not counts or any(c < 1 for c in counts) or len(set(counts)) != len(counts):
        raise ValueError(f"insertion counts must be distinct integers >= 1, got {list(counts)}")
    if per_count < 1 or holdout < 1:
        raise ValueError(f"need per_count >= 1 and holdout >= 1, got {per_count} and {holdout}")
    num_canaries = per_count * len(counts)
    texts = draw_transcripts(vocabulary, num_canaries + holdout, length, seed, exclude)
    width, hwidth = _id_width(num_canaries, 4), _id_width(holdout, 5)
    insertions = [c for c in counts for _ in range(per_count)]
    canaries = [Canary(f"canary_{i:0{width}d}", texts[i], k) for i, k in enumerate(insertions)]
    held = [Canary(f"holdout_{j:0{hwidth}d}", texts[num_canaries + j], 0) for j in range(holdout)]
    return canaries, held


def _voice_of(canary: Canary, voices: Sequence[Voice], seed: int) -> Voice:
    return voices[random.Random(f"{seed}:{canary.id}").randrange(len(voices))]


def synthesize_canaries(
    planned: Sequence[Canary],
    wav_dir: str | Path,
    voices: Sequence[Voice] = (DEFAULT_VOICE,),
    speed: float = 4.0,
    nj: int = 1,
    seed: int = 0,
    desc: str = "canaries",
) -> list[Utterance]:
    """Speak each planned utterance (voice drawn per ID among ``voices``), sped up ``speed``x.

    Returns manifest rows; canaries (``insertions >= 1``) carry an ``insertions`` column.
    """
    if not voices:
        raise ValueError("no voice given")
    wav_dir = Path(wav_dir).resolve()
    jobs = [SynthesisJob(c.text.lower(), _voice_of(c, voices, seed), str(wav_dir / f"{c.id}.wav"), speed)
            for c in planned]
    durations = synthesize_many(jobs, nj=nj, desc=desc)
    return [Utterance(c.id, d, j.path, j.voice.id, c.text, {"insertions": str(c.insertions)} if c.insertions else {})
            for c, j, d in zip(planned, jobs, durations)]


def repeat_id(canary_id: str, repeat: int) -> str:
    """ID of the ``repeat``-th (1-based) training copy of a canary, e.g. ``canary_0003_r2``."""
    return f"{canary_id}_r{repeat}"


def canary_id_of(train_id: str) -> str | None:
    """The canary ID of a repeated training row (``canary_0003_r2`` -> ``canary_0003``), else None."""
    match = _REPEAT.match(train_id)
    return match.group("canary") if match else None


def read_canaries(path) -> tuple[list[Utterance], list[int]]:
    """The canaries of a ``canaries.csv`` and their insertion counts (each an integer >= 1), validated."""
    canaries = read_manifest(path, check_audio=False)
    if not canaries:
        raise ValueError(f"{path}: no canaries")
    if "insertions" not in canaries[0].extra:
        raise ValueError(f"{path}:1: missing column insertions")
    counts = []
    for line, utt in enumerate(canaries, start=2):
        value = utt.extra["insertions"]
        if not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"{path}:{line}: insertions '{value}' of '{utt.id}' is not an integer >= 1")
        counts.append(int(value))
    return canaries, counts


def insert_canaries(train: Sequence[Utterance], canaries: Sequence[Utterance]) -> list[Utterance]:
    """The training rows followed by ``insertions`` copies of each canary (same audio, new IDs)."""
    train_ids = {u.id for u in train}
    rows = [Utterance(u.id, u.duration, u.wav, u.spk_id, u.wrd) for u in train]
    for canary in canaries:
        count = int(canary.extra["insertions"])
        for repeat in range(1, count + 1):
            row_id = repeat_id(canary.id, repeat)
            if row_id in train_ids:
                raise ValueError(f"training manifest already has an utterance with ID '{row_id}'")
            rows.append(Utterance(row_id, canary.duration, canary.wav, canary.spk_id, canary.wrd))
    return rows


def char_duration_stats(utterances: Sequence[Utterance], threshold_ms: float = MIN_MS_PER_CHAR) -> dict:
    """Milliseconds of audio per transcript character (spaces included).

    Returns ``{"n", "min_ms", "median_ms", "max_ms", "below", "threshold_ms"}`` where ``below``
    counts utterances under ``threshold_ms`` (at risk of an infinite CTC loss).
    """
    if not utterances:
        return {"n": 0, "min_ms": None, "median_ms": None, "max_ms": None, "below": 0, "threshold_ms": threshold_ms}
    ms = np.array([1000.0 * u.duration / len(u.wrd) for u in utterances])
    return {"n": len(ms), "min_ms": float(ms.min()), "median_ms": float(np.median(ms)), "max_ms": float(ms.max()),
            "below": int((ms < threshold_ms).sum()), "threshold_ms": threshold_ms}


def format_char_stats(name: str, stats: dict) -> str:
    """One line, e.g. ``canaries: 100 utts, ms/char min 41.2 median 49.0 max 56.1, 0 under 40 ms``."""
    if not stats["n"]:
        return f"{name}: 0 utts"
    return (f"{name}: {stats['n']} utts, ms/char min {stats['min_ms']:.1f} median {stats['median_ms']:.1f} "
            f"max {stats['max_ms']:.1f}, {stats['below']} under {stats['threshold_ms']:g} ms/char")


def _digest(items: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


def make_canaries(
    out_dir: str | Path,
    *,
    train_in: str | Path | None = None,
    train_out: str | Path | None = None,
    vocab: str | Path | None = None,
    counts: Sequence[int] = DEFAULT_COUNTS,
    per_count: int = 20,
    holdout: int = 1000,
    length: int = 7,
    voices: Sequence[Voice] = (DEFAULT_VOICE,),
    speed: float = 4.0,
    nj: int = 1,
    seed: int = 0,
) -> dict[str, Path]:
    """Plan, synthesize and insert canaries; return the paths written.

    Writes ``out_dir/canaries.csv`` (with ``insertions``), ``out_dir/holdout.csv`` and, given
    ``train_in``, ``train_out`` (default ``out_dir/train_with_canaries.csv``). The vocabulary is
    ``vocab`` (a word list) or else the lexicon of ``train_in``. Idempotent and resumable.
    """
    if train_in is None and vocab is None:
        raise ValueError("need a vocabulary: give --train-in (its lexicon is used) or --vocab")
    if train_out is not None and train_in is None:
        raise ValueError("--train-out needs --train-in")
    out_dir = Path(out_dir)
    train = read_manifest(train_in, check_audio=False) if train_in is not None else []
    words = read_lexicon(vocab) if vocab is not None else lexicon(train)
    exclude = sorted({u.wrd for u in train})
    outputs = {"canaries": out_dir / "canaries.csv", "holdout": out_dir / "holdout.csv"}
    if train_in is not None:
        outputs["train"] = Path(train_out) if train_out is not None else out_dir / "train_with_canaries.csv"
    audio_key = {"vocab": _digest(words), "exclude": _digest(exclude), "counts": list(counts), "per_count": per_count,
                 "holdout": holdout, "length": length, "voices": [v.id for v in voices], "speed": speed, "seed": seed}
    train_digest = hashlib.sha256(Path(train_in).read_bytes()).hexdigest() if train_in is not None else None
    params = {**audio_key, "train": train_digest, "outputs": {k: str(v) for k, v in outputs.items()}}
    marker = out_dir / ".canaries.done"
    if is_done(marker, params, outputs.values()):
        log.info("canaries already made in %s (nothing to do)", out_dir)
        return outputs
    canaries, held = plan_canaries(words, counts, per_count, holdout, length, seed, exclude)
    wav_dir = claim_dir(out_dir / "wav", audio_key)
    canary_rows = synthesize_canaries(canaries, wav_dir, voices, speed, nj, seed, desc="canaries")
    holdout_rows = synthesize_canaries(held, wav_dir, voices, speed, nj, seed, desc="holdout")
    write_manifest(outputs["canaries"], canary_rows)
    write_manifest(outputs["holdout"], holdout_rows)
    if train_in is not None:
        write_manifest(outputs["train"], insert_canaries(train, canary_rows))
    mark_done(marker, params)
    return outputs
