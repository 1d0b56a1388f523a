"""CTC loss with relative lengths, usable under ``torch.func.vmap``.

PyTorch's ``F.ctc_loss`` has no vmap batching rule; the fallback loops over
the examples and stacks the auxiliary ``log_alpha`` tensors, whose width
``2 * max(target_lengths) + 1`` differs between examples, so
``vmap(grad(...))`` over a batch with different transcript lengths fails
("stack expects each tensor to be equal size"). :func:`ctc_nll_torch` is the
CTC forward algorithm written with plain tensor ops (autograd gives the
backward), which vmap batches natively. :func:`ctc_loss` picks it
automatically when its input is a functorch-wrapped tensor (inside ``vmap`` or
``grad``), and uses the native kernel otherwise; both agree to float precision
(``tests/test_models.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from privasr.models.encoder import relative_to_absolute

__all__ = ["REDUCTIONS", "IMPLEMENTATIONS", "ctc_loss", "ctc_nll_torch"]

REDUCTIONS = ("mean", "sum", "none")
IMPLEMENTATIONS = ("auto", "native", "torch")

# Finite stand-in for log(0): keeps logsumexp gradients free of NaN (-inf - -inf).
_LOG_ZERO = -1e30


def ctc_nll_torch(log_probs: torch.Tensor, tokens: torch.Tensor, input_lengths: torch.Tensor,
                  target_lengths: torch.Tensor, blank: int = 0) -> torch.Tensor:
    """Per-utterance CTC negative log-likelihood by the forward algorithm.

    With the blank-extended target ``z = (blank, y_1, blank, ..., y_S, blank)``
    (length ``2S + 1``) and ``alpha_t(s)`` the log-probability of all paths
    over frames ``0..t`` ending in ``z_s``::

        alpha_t(s) = logsumexp(alpha_{t-1}(s), alpha_{t-1}(s-1),
                               alpha_{t-1}(s-2) if z_s != blank and z_s != z_{s-2})
                     + log_probs[t, z_s]
        nll = -logsumexp(alpha_{T-1}(2S), alpha_{T-1}(2S-1))

    Arguments: ``log_probs [B, T, V]``, ``tokens [B, S]``, absolute
    ``input_lengths [B]`` and ``target_lengths [B]``. Returns ``[B]``, ``inf``
    where the transcript cannot be aligned in the available frames.
    Frames past ``input_lengths[b]`` leave ``alpha`` unchanged, so padding has
    no effect. Loops over time in Python (``T`` steps of small tensor ops).
    """
    batch, time, _ = log_probs.shape
    ext = _blank_extended(tokens.long(), blank)  # [B, 2S+1]
    ext_len = ext.shape[1]
    emit = log_probs.gather(2, ext.unsqueeze(1).expand(batch, time, ext_len))  # [B, T, 2S+1]
    skip_ok = (ext[:, 2:] != blank) & (ext[:, 2:] != ext[:, :-2])
    can_skip = torch.cat([torch.zeros_like(ext[:, :2], dtype=torch.bool), skip_ok], dim=1)
    neg = torch.full_like(emit[:, 0], _LOG_ZERO)
    start = torch.arange(ext_len, device=ext.device) < 2
    alpha = torch.where(start.unsqueeze(0), emit[:, 0], neg)
    for t in range(1, time):
        prev1 = torch.cat([neg[:, :1], alpha[:, :-1]], dim=1)
        prev2 = torch.where(can_skip, torch.cat([neg[:, :2], alpha[:, :-2]], dim=1), neg)
        step = torch.logsumexp(torch.stack([alpha, prev1, prev2]), dim=0) + emit[:, t]
        alpha = torch.where((t < input_lengths).unsqueeze(1), step, alpha)
    last = (2 * target_lengths).unsqueeze(1)
    ends = torch.cat([alpha.gather(1, last), alpha.gather(1, (last - 1).clamp(min=0))], dim=1)
    ends = torch.where((target_lengths > 0).unsqueeze(1), ends,
                       torch.cat([ends[:, :1], torch.full_like(ends[:, :1], _LOG_ZERO)], dim=1))
    log_likelihood = torch.logsumexp(ends, dim=1)
    unreachable = log_likelihood < _LOG_ZERO / 2
    return torch.where(unreachable, torch.full_like(log_likelihood, float("inf")), -log_likelihood)


def _blank_extended(tokens: torch.Tensor, blank: int) -> torch.Tensor:
    """``[B, S]`` -> ``[B, 2S+1]``: blanks interleaved around every token."""
    batch, length = tokens.shape
    ext = torch.full((batch, 2 * length + 1), blank, dtype=tokens.dtype, device=tokens.device)
    return ext.index_copy(1, torch.arange(1, 2 * length, 2, device=tokens.device), tokens)


def _inside_functorch(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` is wrapped by a functorch transform (vmap / grad)."""
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(tensor))
    except AttributeError:  # pragma: no cover - very old / very new torch
        return True


def ctc_loss(log_probs: torch.Tensor, out_lens: torch.Tensor, tokens: torch.Tensor,
             token_lens: torch.Tensor, reduction: str = "mean", blank: int = 0,
             implementation: str = "auto") -> torch.Tensor:
    """CTC loss with SpeechBrain-style relative lengths.

    Arguments
    ---------
    log_probs: ``[B, T, V]`` log-softmax outputs.
    out_lens: ``[B]`` relative lengths of ``log_probs`` (``round(rel * T)`` frames).
    tokens: ``[B, S]`` padded target ids (never ``blank``).
    token_lens: ``[B]`` relative lengths of ``tokens``.
    reduction:
        ``"none"``: per-utterance negative log-likelihood ``[B]``, *not* zeroed
        when infinite (transcript longer than the frames allow), so a caller
        sees which utterances cannot be aligned (the ASR Brain averages the
        finite ones and writes ``inf`` as that utterance's score);
        ``"sum"``: ``sum_b nll_b``, infinite terms zeroed (and their gradients);
        ``"mean"``: ``mean_b nll_b / max(S_b, 1)``, infinite terms zeroed
        (PyTorch's and SpeechBrain's ``"mean"``).
    implementation: ``"native"`` (``F.ctc_loss``), ``"torch"``
        (:func:`ctc_nll_torch`, vmap-able) or ``"auto"`` (``"torch"`` inside
        functorch transforms, ``"native"`` otherwise).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    input_lengths = relative_to_absolute(out_lens, log_probs.shape[1])
    target_lengths = relative_to_absolute(token_lens, tokens.shape[1])
    if implementation == "auto":
        implementation = "torch" if _inside_functorch(log_probs) else "native"
    if implementation == "torch":
        nll = ctc_nll_torch(log_probs, tokens, input_lengths, target_lengths, blank)
    else:
        nll = F.ctc_loss(log_probs.transpose(0, 1), tokens.long(), input_lengths,
                         target_lengths, blank=blank, reduction="none",
                         zero_infinity=reduction != "none")
    if reduction == "none":
        return nll
    nll = torch.where(torch.isfinite(nll), nll, torch.zeros_like(nll))
    if reduction == "sum":
        return nll.sum()
    return (nll / target_lengths.clamp(min=1).to(nll.dtype)).mean()

