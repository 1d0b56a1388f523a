"""CTC decoding: greedy (best path) and prefix beam search.

Both take the model's ``log_probs [B, T, V]`` and SpeechBrain relative
lengths ``[B]`` and return one list of token ids per utterance (blank and
repeats collapsed). Transducer greedy search lives in
:meth:`privasr.models.transducer.ConformerTransducer.greedy_decode`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict, List, Sequence, Tuple

import torch

__all__ = ["ctc_greedy_decode", "ctc_prefix_beam_search", "prefix_beam_search_one",
           "collapse_ctc"]

Prefix = Tuple[int, ...]


def _frame_counts(log_probs: torch.Tensor, lengths: torch.Tensor) -> List[int]:
    """Relative lengths ``[B]`` -> absolute frame counts (``round(rel * T)``)."""
    if log_probs.dim() != 3:
        raise ValueError(f"log_probs must be [B, T, V], got shape {tuple(log_probs.shape)}")
    if lengths.shape != log_probs.shape[:1]:
        raise ValueError(f"lengths must be [B={log_probs.shape[0]}], got {tuple(lengths.shape)}")
    return torch.round(lengths * log_probs.shape[1]).long().tolist()


def collapse_ctc(path: Sequence[int], blank: int = 0) -> List[int]:
    """Frame labels -> label sequence: merge repeats, then drop blanks."""
    out: List[int] = []
    previous = None
    for label in path:
        if label != previous and label != blank:
            out.append(int(label))
        previous = label
    return out


def ctc_greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor,
                      blank: int = 0) -> List[List[int]]:
    """Best-path decoding: per-frame argmax over the valid frames, collapsed."""
    frames = _frame_counts(log_probs, lengths)
    best = log_probs.argmax(dim=-1).tolist()
    return [collapse_ctc(path[:n], blank) for path, n in zip(best, frames)]


def _logaddexp(a: float, b: float) -> float:
    """``log(exp(a) + exp(b))`` for Python floats, exact at ``-inf``."""
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    high, low = (a, b) if a > b else (b, a)
    return high + math.log1p(math.exp(low - high))


def prefix_beam_search_one(log_probs: torch.Tensor, beam_size: int = 10, blank: int = 0,
                           prune_top_k: int = 0) -> List[Tuple[List[int], float]]:
    """CTC prefix beam search over one utterance ``[T, V]`` (valid frames only).

    Each prefix ``l`` keeps two scores: ``p_b(l)`` (all paths for ``l`` ending
    in blank) and ``p_nb(l)`` (ending in the last label of ``l``). For frame
    ``t`` with label scores ``y``::

        p_b'(l)    += (p_b(l) + p_nb(l)) * y[blank]
        p_nb'(l)   += p_nb(l) * y[l_last]                       (repeat, merged)
        p_nb'(l+c) += (p_b(l) + p_nb(l)) * y[c]                 c != l_last
        p_nb'(l+c) += p_b(l) * y[c]                             c == l_last

    (in log space), then keep the ``beam_size`` best prefixes by
    ``p_b + p_nb``. Returns ``[(labels, log_prob), ...]`` best first.
    ``prune_top_k > 0`` only extends with the ``k`` best labels of a frame.
    """
    beams: Dict[Prefix, Tuple[float, float]] = {(): (0.0, -math.inf)}
    rows = log_probs.tolist()
    top = (log_probs.topk(min(prune_top_k, log_probs.shape[1]), dim=-1).indices.tolist()
           if prune_top_k > 0 else None)
    for t, row in enumerate(rows):
        labels = top[t] if top is not None else range(len(row))
        nxt: Dict[Prefix, List[float]] = defaultdict(lambda: [-math.inf, -math.inf])
        for prefix, (p_b, p_nb) in beams.items():
            total = _logaddexp(p_b, p_nb)
            last = prefix[-1] if prefix else None
            entry = nxt[prefix]
            entry[0] = _logaddexp(entry[0], total + row[blank])
            if last is not None:
                entry[1] = _logaddexp(entry[1], p_nb + row[last])
            for label in labels:
                if label == blank:
                    continue
                extended = nxt[prefix + (label,)]
                source = p_b if label == last else total
                extended[1] = _logaddexp(extended[1], source + row[label])
        ranked = sorted(nxt.items(), key=lambda item: -_logaddexp(*item[1]))
        beams = {prefix: (p_b, p_nb) for prefix, (p_b, p_nb) in ranked[:beam_size]}
    ranked = sorted(beams.items(), key=lambda item: -_logaddexp(*item[1]))
    return [(list(prefix), _logaddexp(*scores)) for prefix, scores in ranked]


def ctc_prefix_beam_search(log_probs: torch.Tensor, lengths: torch.Tensor, beam_size: int = 10,
                           blank: int = 0, prune_top_k: int = 0) -> List[List[int]]:
    """Best hypothesis of :func:`prefix_beam_search_one` for each utterance.

    ``log_probs [B, T, V]`` (log-softmax), ``lengths [B]`` relative. Pure
    Python over frames, beams and labels: set ``prune_top_k`` (e.g. 20) for
    large vocabularies.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    frames = _frame_counts(log_probs, lengths)
    log_probs = log_probs.detach().float().cpu()
    return [prefix_beam_search_one(log_probs[b, :n], beam_size, blank, prune_top_k)[0][0]
            for b, n in enumerate(frames)]
