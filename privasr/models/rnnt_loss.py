"""RNN-T (transducer) loss with relative lengths, usable under ``torch.func.vmap``.

``torchaudio.functional.rnnt_loss`` is a custom ``autograd.Function`` without
``setup_context``, so functorch transforms refuse it. :func:`rnnt_nll_torch`
is the transducer forward algorithm (Graves 2012) in plain tensor ops; each
time step is one ``logcumsumexp`` over the label axis. :func:`rnnt_loss`
uses it inside functorch transforms and torchaudio's kernel otherwise; both
agree to float precision (``tests/test_models.py``).
"""

from __future__ import annotations

import torch
import torchaudio.functional as audio_functional

from privasr.models.ctc_loss import IMPLEMENTATIONS, REDUCTIONS, _inside_functorch
from privasr.models.encoder import relative_to_absolute

__all__ = ["rnnt_loss", "rnnt_nll_torch"]


def rnnt_nll_torch(logits: torch.Tensor, tokens: torch.Tensor, logit_lengths: torch.Tensor,
                   target_lengths: torch.Tensor, blank: int = 0) -> torch.Tensor:
    """Per-utterance transducer negative log-likelihood ``[B]``.

    With ``p = log_softmax(logits)`` of shape ``[B, T, U+1, V]``,
    ``phi(t, u) = p[t, u, blank]`` and ``e(t, u) = p[t, u, y_{u+1}]``::

        alpha(0, 0) = 0
        alpha(t, u) = logaddexp(alpha(t-1, u) + phi(t-1, u), alpha(t, u-1) + e(t, u-1))
        nll = -(alpha(T_b - 1, U_b) + phi(T_b - 1, U_b))

    The label recursion of one time step is solved in closed form with
    ``C(u) = sum_{j<u} e(t, j)``:
    ``alpha(t, u) = C(u) + logcumsumexp_k(alpha(t-1, k) + phi(t-1, k) - C(k))``.
    ``logit_lengths`` / ``target_lengths`` are absolute ``[B]``; padding never
    reaches ``alpha(T_b - 1, U_b)``.
    """
    log_probs = logits.log_softmax(dim=-1)
    batch, time, labels, _ = log_probs.shape
    phi = log_probs[..., blank]  # [B, T, U+1]
    index = tokens.long()[:, None, :, None].expand(batch, time, labels - 1, 1)
    emit = log_probs[:, :, :-1, :].gather(3, index).squeeze(3)  # [B, T, U]
    cum_emit = torch.cat([torch.zeros_like(emit[..., :1]), emit.cumsum(dim=-1)], dim=-1)
    alpha = cum_emit[:, 0]  # [B, U+1]: alpha(0, u)
    rows = [alpha]
    for t in range(1, time):
        from_below = alpha + phi[:, t - 1] - cum_emit[:, t]
        alpha = cum_emit[:, t] + torch.logcumsumexp(from_below, dim=-1)
        rows.append(alpha)
    alphas = torch.stack(rows, dim=1)  # [B, T, U+1]
    last_t = (logit_lengths - 1).clamp(min=0)
    final = alphas + phi
    final = final.gather(1, last_t.view(batch, 1, 1).expand(batch, 1, labels)).squeeze(1)
    return -final.gather(1, target_lengths.view(batch, 1)).squeeze(1)


def rnnt_loss(logits: torch.Tensor, out_lens: torch.Tensor, tokens: torch.Tensor,
              token_lens: torch.Tensor, reduction: str = "mean", blank: int = 0,
              implementation: str = "auto") -> torch.Tensor:
    """Transducer loss with SpeechBrain-style relative lengths.

    Arguments
    ---------
    logits: ``[B, T, U+1, V]`` joint-network outputs (unnormalized).
    out_lens: ``[B]`` relative encoder lengths (``round(rel * T)`` frames).
    tokens: ``[B, U]`` padded target ids (never ``blank``).
    token_lens: ``[B]`` relative target lengths.
    reduction: ``"none"`` (per utterance ``[B]``), ``"sum"``, or ``"mean"``
        (``mean_b nll_b / max(U_b, 1)``, the same normalization as the CTC
        loss; note torchaudio's own ``"mean"`` does not divide by ``U_b``).
    implementation: ``"native"`` (torchaudio), ``"torch"``
        (:func:`rnnt_nll_torch`, vmap-able) or ``"auto"``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    logit_lengths = relative_to_absolute(out_lens, logits.shape[1])
    target_lengths = relative_to_absolute(token_lens, tokens.shape[1])
    if implementation == "auto":
        implementation = "torch" if _inside_functorch(logits) else "native"
    if implementation == "torch":
        nll = rnnt_nll_torch(logits, tokens, logit_lengths, target_lengths, blank)
    else:
        # torchaudio insists that the longest lengths fill the padded tensors, which is not so
        # for a shard of a batch padded as a whole: trim the padding first.
        max_t, max_u = int(logit_lengths.max()), int(target_lengths.max())
        logits, tokens = logits[:, :max_t, : max_u + 1].contiguous(), tokens[:, :max_u].contiguous()
        nll = audio_functional.rnnt_loss(
            logits.float(), tokens.int(), logit_lengths.int(), target_lengths.int(),
            blank=blank, reduction="none")
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    return (nll / target_lengths.clamp(min=1).to(nll.dtype)).mean()
