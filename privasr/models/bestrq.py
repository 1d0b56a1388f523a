r"""BEST-RQ: BERT-style self-supervised pre-training with a random-projection quantizer.

Chiu et al. 2022 (arXiv:2202.01855), as used for DP pre-training in the paper.
For features :math:`x \in \mathbb{R}^{T \times F}` (valid length :math:`n`):

1. **Targets.** Stack :math:`S` consecutive frames to the encoder rate,
   :math:`u_\tau = [x_{S\tau}; \dots; x_{S\tau+S-1}] \in \mathbb{R}^{SF}`, normalise each
   dimension over the :math:`\lfloor n/S \rfloor` complete valid stacked frames of the
   utterance, and quantise with a *frozen* random projection :math:`P` (Xavier) and
   codebook :math:`\{c_v\}_{v=1}^{V}` of unit vectors:

   .. math::

       y_\tau = \arg\min_v \Big\| c_v - \frac{P^\top u_\tau}{\|P^\top u_\tau\|} \Big\|
              = \arg\max_v \; c_v^\top \frac{P^\top u_\tau}{\|P^\top u_\tau\|} .

2. **Masking.** Every valid stacked frame starts a masked span of ``mask_span`` stacked
   frames with probability ``mask_prob``; all input frames of a masked stacked frame
   are replaced by noise :math:`\mathcal{N}(0, 0.1^2)`.
3. **Loss.** A linear head maps the encoder output to :math:`V` logits;
   cross-entropy on masked, valid frames only:

   .. math::

       \mathcal{L} = \frac{\sum_{b,\tau} m_{b\tau}\,\mathrm{CE}(W h_{b\tau}, y_{b\tau})}
                          {\max(1, \sum_{b,\tau} m_{b\tau})} .

The defaults (``mask_prob=0.04`` per 40 ms frame, spans of 10 frames = 400 ms, about a
third of the frames masked) match BEST-RQ's 1% per 10 ms frame with 400 ms spans.

For per-example gradients (``torch.func.vmap``), draw the randomness once with
:meth:`BestRQ.prepare` outside the transform and differentiate :meth:`BestRQ.loss`,
which has no randomness and no data-dependent Python control flow.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from speechbrain.nnet.quantisers import RandomProjectionQuantizer
from torch import nn

REDUCTIONS = ("mean", "per_example")


class BestRQBatch(NamedTuple):
    """The random, non-differentiable half of a BEST-RQ step (see :meth:`BestRQ.prepare`).

    Attributes:
        inputs: features with masked frames replaced by noise, ``[B, T, F]``.
        targets: codebook indices at the encoder rate, ``[B, T']`` (long).
        mask: frames that enter the loss (masked and valid), ``[B, T']`` (bool).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


class BestRQ(nn.Module):
    r"""The BEST-RQ objective around any encoder.

    Args:
        encoder: module with ``encoder(feats [B, T, F], lens [B]) -> [B, T', encoder_dim]``
            (or a tuple whose first item is that), :math:`T' \approx \lceil T/S \rceil`,
            lengths relative in [0, 1] (SpeechBrain convention).
        feat_dim: :math:`F`, input feature dimension (e.g. 80 fbanks).
        encoder_dim: width of the encoder output.
        codebook_size: :math:`V` codes (BEST-RQ: 8192).
        codebook_dim: dimension of the projected space and the codes (BEST-RQ: 16).
        stack_frames: :math:`S`, the encoder's subsampling factor.
        mask_prob: probability that a valid stacked frame starts a masked span.
        mask_span: span length, in stacked (encoder) frames.
        noise_std: std of the noise replacing masked input frames.
        seed: seeds the quantizer (so it is the same on every rank and after a
            resume; it is also saved as buffers) and the masking generator.
        encoder_method: name of the encoder method to call (e.g. ``"encode"``).
    """

    def __init__(self, encoder: nn.Module, feat_dim: int, encoder_dim: int,
                 codebook_size: int = 8192, codebook_dim: int = 16, stack_frames: int = 4,
                 mask_prob: float = 0.04, mask_span: int = 10, noise_std: float = 0.1,
                 seed: int = 0, encoder_method: str = "forward"):
        super().__init__()
        for name in ("feat_dim", "encoder_dim", "codebook_size", "codebook_dim", "stack_frames", "mask_span"):
            _positive_int(name, locals()[name])
        if not 0.0 <= mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob!r}")
        if not noise_std >= 0.0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
        if not callable(getattr(encoder, encoder_method, None)):
            raise ValueError(f"encoder has no method {encoder_method!r}; "
                             "give the name of its encoding method")
        self.encoder = encoder
        self.encoder_method = encoder_method
        self.feat_dim, self.encoder_dim, self.stack_frames = feat_dim, encoder_dim, stack_frames
        self.mask_prob, self.mask_span, self.noise_std = float(mask_prob), mask_span, float(noise_std)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.quantizer = RandomProjectionQuantizer(feat_dim * stack_frames, codebook_dim, codebook_size)
        self.quantizer.requires_grad_(False)
        self.head = nn.Linear(encoder_dim, codebook_size)
        self.generator = torch.Generator().manual_seed(seed)

    # -- lengths and stacking ------------------------------------------------------
    def num_stacked(self, frames: int) -> int:
        r""":math:`T' = \lceil T / S \rceil`, stacked frames of a padded batch of :math:`T` frames."""
        return -(-frames // self.stack_frames)

    def valid_stacked(self, lens: torch.Tensor, frames: int) -> torch.Tensor:
        r"""Complete valid stacked frames per utterance, :math:`\lfloor \mathrm{round}(\ell T)/S \rfloor`."""
        return torch.div(torch.round(lens * frames).long(), self.stack_frames, rounding_mode="floor")

    def stack(self, feats: torch.Tensor) -> torch.Tensor:
        """``[B, T, F] -> [B, ceil(T/S), S*F]``, zero-padding the last group."""
        b, t, f = feats.shape
        pad = self.num_stacked(t) * self.stack_frames - t
        return F.pad(feats, (0, 0, 0, pad)).reshape(b, -1, self.stack_frames * f)

    # -- the random half -----------------------------------------------------------
    @torch.no_grad()
    def targets(self, feats: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """Quantizer codes ``[B, ceil(T/S)]`` of the clean features (padding gets code 0)."""
        self._check_feats(feats, lens)
        u = self.stack(feats.float())
        valid = self._valid_mask(self.valid_stacked(lens, feats.shape[1]), u.shape[1]).unsqueeze(-1)
        count = valid.sum(dim=1, keepdim=True).clamp(min=1)
        mean = (u * valid).sum(dim=1, keepdim=True) / count
        std = (((u - mean) * valid) ** 2).sum(dim=1, keepdim=True).div(count).sqrt()
        u = torch.where(valid, (u - mean) / (std + 1e-5), torch.zeros_like(u))
        proj = F.normalize(u @ self.quantizer.P, dim=-1)
        return (proj @ self.quantizer.CB.t()).argmax(dim=-1)

    @torch.no_grad()
    def sample_mask(self, lens: torch.Tensor, frames: int) -> torch.Tensor:
        """Span mask ``[B, ceil(T/S)]``: True on masked valid stacked frames; uses :attr:`generator`."""
        valid = self._valid_mask(self.valid_stacked(lens, frames), self.num_stacked(frames))
        starts = torch.rand(valid.shape, generator=self.generator) < self.mask_prob
        starts = starts.to(valid.device) & valid
        return self._spread(starts) & valid

    def _spread(self, starts: torch.Tensor) -> torch.Tensor:
        """Frame t is masked if a span starts in [t - span + 1, t]."""
        x = F.pad(starts.float().unsqueeze(1), (self.mask_span - 1, 0))
        return F.max_pool1d(x, self.mask_span, stride=1).squeeze(1) > 0

    @torch.no_grad()
    def corrupt(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        r"""Replace the input frames of masked stacked frames by :math:`\mathcal{N}(0, \sigma_n^2)`.

        :math:`\sigma_n` is ``noise_std``; the noise comes from :attr:`generator`.
        """
        frames = mask.repeat_interleave(self.stack_frames, dim=1)[:, : feats.shape[1]].unsqueeze(-1)
        noise = torch.randn(feats.shape, generator=self.generator).to(feats) * self.noise_std
        return torch.where(frames, noise, feats)

    def prepare(self, feats: torch.Tensor, lens: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> BestRQBatch:
        """Targets, a span mask (sampled unless given) and the corrupted inputs."""
        targets = self.targets(feats, lens)
        valid = self._valid_mask(self.valid_stacked(lens, feats.shape[1]), targets.shape[1])
        if mask is None:
            mask = self.sample_mask(lens, feats.shape[1])
        elif mask.shape != targets.shape:
            raise ValueError(f"mask must have shape {tuple(targets.shape)} (B, ceil(T/S)), "
                             f"got {tuple(mask.shape)}")
        mask = mask.to(torch.bool) & valid
        return BestRQBatch(self.corrupt(feats, mask), targets, mask)

    # -- the differentiable half ---------------------------------------------------
    def loss(self, inputs: torch.Tensor, lens: torch.Tensor, targets: torch.Tensor,
             mask: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of the head's logits against ``targets`` on ``mask`` frames.

        Args:
            reduction: ``"mean"`` over all masked frames of the batch (a scalar), or
                ``"per_example"``, each example's mean over its masked frames (``[B]``).
        """
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        out = getattr(self.encoder, self.encoder_method)(inputs, lens)
        out = out[0] if isinstance(out, (tuple, list)) else out
        if out.dim() != 3 or out.shape[-1] != self.encoder_dim:
            raise ValueError(f"encoder must return [B, T', {self.encoder_dim}], got {tuple(out.shape)}")
        n = min(out.shape[1], targets.shape[1])
        logits = self.head(out[:, :n])
        ce = F.cross_entropy(logits.transpose(1, 2), targets[:, :n], reduction="none")
        weight = mask[:, :n].to(ce.dtype)
        if reduction == "per_example":
            return (ce * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)
        return (ce * weight).sum() / weight.sum().clamp(min=1.0)

    def forward(self, feats: torch.Tensor, lens: torch.Tensor, mask: Optional[torch.Tensor] = None,
                reduction: str = "mean") -> torch.Tensor:
        """BEST-RQ loss of a batch: :meth:`prepare` then :meth:`loss`."""
        batch = self.prepare(feats, lens, mask)
        return self.loss(batch.inputs, lens, batch.targets, batch.mask, reduction)

    # -- helpers -------------------------------------------------------------------
    def _valid_mask(self, valid: torch.Tensor, width: int) -> torch.Tensor:
        return torch.arange(width, device=valid.device).unsqueeze(0) < valid.unsqueeze(1)

    def _check_feats(self, feats: torch.Tensor, lens: torch.Tensor) -> None:
        if feats.dim() != 3 or feats.shape[-1] != self.feat_dim:
            raise ValueError(f"feats must be [B, T, {self.feat_dim}], got {tuple(feats.shape)}")
        if lens.shape != feats.shape[:1]:
            raise ValueError(f"lens must be [B] = [{feats.shape[0]}] relative lengths, "
                             f"got {tuple(lens.shape)}")
