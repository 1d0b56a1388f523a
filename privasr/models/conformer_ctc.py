"""Conformer-CTC: the shared :class:`~privasr.models.encoder.ConformerEncoder`
followed by a linear CTC head (blank = 0).

Contract used by the recipes and by the clipping code::

    log_probs, out_lens = model(wavs, wav_lens)            # [B, T, V], rel [B]
    loss = model.loss(log_probs, out_lens, tokens, token_lens, reduction="mean")

Per-example gradients (``privasr.per_sample``): the model has no BatchNorm,
no cross-example statistics and no data-dependent Python control flow, so
``vmap(grad(lambda p, w, l, y, yl: loss(functional_call(model, p, (w[None], l[None])), ...)))``
over a padded batch gives the same gradients as the unpadded examples one by
one (``tests/test_models.py``). With SpecAugment, augment the batch first
(``feats, lens = model.features(...); feats = model.augment(feats, lens)``)
and vmap over :meth:`ConformerCTC.forward_features`.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from privasr.models.ctc_loss import REDUCTIONS, ctc_loss
from privasr.models.encoder import ConformerEncoder, encoder_param_groups

__all__ = ["ConformerCTC", "ctc_loss", "REDUCTIONS", "encoder_param_groups"]

class ConformerCTC(nn.Module):
    """Conformer encoder + linear CTC head.

    Arguments
    ---------
    vocab_size: output classes *including* the CTC blank (id 0), i.e.
        ``Tokenizer.vocab_size``.
    d_model, num_layers, nhead, d_ffn, kernel_size, dropout, n_mels:
        see :class:`~privasr.models.encoder.ConformerEncoder`.
    subsampling_channels: channels of the conv front end (default ``d_model``).
    subsampling_factor: 4 (40 ms output frames) or 2 (20 ms).
    spec_augment: optional SpecAugment module for :meth:`augment`.

    ``forward(wavs [B, N], wav_lens [B]) -> (log_probs [B, T, vocab_size], out_lens [B])``,
    lengths relative, ``T = ceil(ceil((N // 160 + 1) / 2) / 2)`` (40 ms frames; ``ceil((N // 160 + 1) / 2)``, 20 ms, at
    ``subsampling_factor=2``).
    """

    blank_id = 0

    def __init__(self, vocab_size: int, d_model: int, num_layers: int, nhead: int,
                 d_ffn: int, kernel_size: int = 31, dropout: float = 0.1, n_mels: int = 80,
                 subsampling_channels: Optional[int] = None,
                 spec_augment: Optional[nn.Module] = None, subsampling_factor: int = 4):
        super().__init__()
        if not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"vocab_size must be an int >= 2 (blank + 1 token), got {vocab_size!r}")
        self.vocab_size = vocab_size
        self.encoder = ConformerEncoder(d_model, num_layers, nhead, d_ffn, kernel_size, dropout,
                                        n_mels, subsampling_channels=subsampling_channels,
                                        spec_augment=spec_augment, subsampling_factor=subsampling_factor)
        self.ctc_head = nn.Linear(d_model, vocab_size)

    def features(self, wavs: torch.Tensor, wav_lens: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Normalized fbanks (no parameters): see ``ConformerEncoder.features``."""
        return self.encoder.features(wavs, wav_lens)

    def augment(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> torch.Tensor:
        """SpecAugment on a batch in training mode (identity otherwise)."""
        return self.encoder.augment(feats, feat_lens)

    def forward_features(self, feats: torch.Tensor, feat_lens: torch.Tensor
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Features ``[B, F, n_mels]`` -> (log-probs ``[B, T, V]``, rel ``[B]``)."""
        enc, out_lens = self.encoder.encode(feats, feat_lens)
        return self.ctc_head(enc).log_softmax(dim=-1), out_lens

    def forward(self, wavs: torch.Tensor, wav_lens: torch.Tensor, augment: bool = False
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Waveforms ``[B, N]`` -> (log-probs ``[B, T, V]``, rel ``[B]``).

        ``augment=True`` applies SpecAugment in training mode (not under vmap).
        """
        feats, feat_lens = self.features(wavs, wav_lens)
        if augment:
            feats = self.augment(feats, feat_lens)
        return self.forward_features(feats, feat_lens)

    def loss(self, log_probs: torch.Tensor, out_lens: torch.Tensor, tokens: torch.Tensor,
             token_lens: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """CTC loss, see :func:`privasr.models.ctc_loss.ctc_loss` for the reductions.

        Inside ``vmap``/``grad`` the vmap-able pure-torch forward algorithm is
        used automatically.
        """
        return ctc_loss(log_probs, out_lens, tokens, token_lens, reduction, self.blank_id)

    def param_groups(self) -> Dict[str, List[str]]:
        """Parameter names per layer: ``frontend``, ``layer.i``, ``final_norm``, ``ctc_head``."""
        return encoder_param_groups(self)
