"""Tests for privasr.decoding: CTC greedy and prefix beam search."""

import itertools
import math

import pytest
import torch

from privasr.decoding import (
    collapse_ctc,
    ctc_greedy_decode,
    ctc_prefix_beam_search,
    prefix_beam_search_one,
)


def _peaky(path, vocab, peak=0.9):
    """Log-probs ``[T, V]`` putting ``peak`` on ``path[t]`` and the rest uniformly."""
    probs = torch.full((len(path), vocab), (1 - peak) / (vocab - 1))
    probs[torch.arange(len(path)), torch.tensor(path)] = peak
    return probs.log()


def _collapsed_sequence_probs(log_probs, blank=0):
    """Brute force: probability of every collapsed label sequence (small T, V)."""
    probs = log_probs.exp()
    totals = {}
    for path in itertools.product(range(probs.shape[1]), repeat=probs.shape[0]):
        p = math.prod(probs[t, label].item() for t, label in enumerate(path))
        key = tuple(collapse_ctc(path, blank))
        totals[key] = totals.get(key, 0.0) + p
    return totals


def test_collapse_merges_repeats_then_drops_blanks():
    assert collapse_ctc([0, 1, 1, 0, 1, 2, 2, 0, 0]) == [1, 1, 2]
    assert collapse_ctc([0, 0]) == []


def test_greedy_respects_lengths():
    batch = torch.stack([_peaky([1, 1, 0, 2, 3, 3], 5), _peaky([4, 0, 4, 2, 3, 1], 5)])
    lengths = torch.tensor([1.0, 3 / 6])
    assert ctc_greedy_decode(batch, lengths) == [[1, 2, 3], [4, 4]]


def test_beam_size_one_equals_greedy_on_peaky_outputs():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        path = torch.randint(0, 5, (20,), generator=gen).tolist()
        log_probs = _peaky(path, 5)[None]
        lengths = torch.ones(1)
        assert ctc_prefix_beam_search(log_probs, lengths, beam_size=1) == \
            ctc_greedy_decode(log_probs, lengths)


def test_beam_finds_more_probable_sequence_than_greedy():
    # Each frame: blank 0.6, "a" 0.4. Greedy: blank blank -> "" (p = 0.36);
    # but "a" has p = 0.4*0.4 + 0.4*0.6 + 0.6*0.4 = 0.64.
    log_probs = torch.tensor([[[0.6, 0.4], [0.6, 0.4]]]).log()
    lengths = torch.ones(1)
    assert ctc_greedy_decode(log_probs, lengths) == [[]]
    assert ctc_prefix_beam_search(log_probs, lengths, beam_size=2) == [[1]]
    nbest = prefix_beam_search_one(log_probs[0], beam_size=2)
    assert nbest[0][0] == [1] and nbest[0][1] == pytest.approx(math.log(0.64))
    assert nbest[1][0] == [] and nbest[1][1] == pytest.approx(math.log(0.36))


def test_wide_beam_matches_brute_force():
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        log_probs = torch.randn(5, 3, generator=gen).mul(2).log_softmax(-1)
        exact = _collapsed_sequence_probs(log_probs)
        best, score = prefix_beam_search_one(log_probs, beam_size=100)[0]
        assert tuple(best) == max(exact, key=exact.get)
        assert score == pytest.approx(math.log(exact[tuple(best)]), rel=1e-5)


def test_pruning_and_lengths_in_batch_search():
    gen = torch.Generator().manual_seed(4)
    log_probs = torch.randn(2, 8, 6, generator=gen).log_softmax(-1)
    lengths = torch.tensor([1.0, 0.5])
    full = ctc_prefix_beam_search(log_probs, lengths, beam_size=4)
    assert full[1] == ctc_prefix_beam_search(log_probs[1:, :4], torch.ones(1), beam_size=4)[0]
    assert ctc_prefix_beam_search(log_probs, lengths, beam_size=4, prune_top_k=6) == full


def test_bad_arguments():
    log_probs = torch.zeros(1, 3, 4)
    with pytest.raises(ValueError, match="beam_size"):
        ctc_prefix_beam_search(log_probs, torch.ones(1), beam_size=0)
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        ctc_greedy_decode(log_probs[0], torch.ones(1))
    with pytest.raises(ValueError, match="lengths"):
        ctc_greedy_decode(log_probs, torch.ones(2))
