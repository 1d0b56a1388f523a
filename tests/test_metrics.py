"""Tests for privasr.metrics against hand-computed edit distances."""

import pytest

from privasr.metrics import (
    ErrorCounts,
    cer,
    char_errors,
    per_utterance_cer,
    per_utterance_wer,
    utterance_cer,
    utterance_wer,
    wer,
    word_errors,
)

REFS = ["the cat sat on the mat", "hello world"]
HYPS = ["the bat sat on mat", "hello  big world"]
# utt 0: cat->bat (1 sub), "the" deleted (1 del): 2 errors / 6 words
# utt 1: "big" inserted (1 ins): 1 error / 2 words (double space is collapsed)


def test_word_counts_and_corpus_wer():
    counts = word_errors(REFS, HYPS)
    assert counts == ErrorCounts(substitutions=1, deletions=1, insertions=1, reference_length=8)
    assert wer(REFS, HYPS) == pytest.approx(3 / 8)
    assert counts.summary() == "%WER 37.50 [ 3 / 8, 1 ins, 1 del, 1 sub ]"


def test_per_utterance_wer():
    assert per_utterance_wer(REFS, HYPS) == pytest.approx([2 / 6, 1 / 2])
    assert utterance_wer("a b c", "a b c") == 0.0
    assert utterance_wer("a b", "") == 1.0


def test_character_error_rates():
    # "abcd" -> "abed": 1 sub / 4; "ab cd" -> "abcd": the space deleted, 1 / 5
    assert utterance_cer("abcd", "abed") == pytest.approx(1 / 4)
    assert utterance_cer("ab cd", "abcd") == pytest.approx(1 / 5)
    assert per_utterance_cer(["abcd", "ab cd"], ["abed", "abcd"]) == pytest.approx([1 / 4, 1 / 5])
    assert cer(["abcd", "ab cd"], ["abed", "abcd"]) == pytest.approx(2 / 9)
    assert char_errors(["abc"], ["abcxy"]) == ErrorCounts(0, 0, 2, 3)


def test_empty_reference_counts_insertions():
    assert utterance_wer("", "a b") == 2.0
    assert utterance_wer("", "") == 0.0
    assert wer(["", "a"], ["x", "a"]) == 1.0
    with pytest.raises(ValueError, match="undefined"):
        wer([""], ["a"])


def test_bad_inputs():
    with pytest.raises(ValueError, match="references but"):
        wer(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="lists"):
        cer("abc", "abd")
