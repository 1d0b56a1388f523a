"""Stop padding from leaking into a Conformer's depthwise convolution.

SpeechBrain 1.1.2's ``ConvolutionModule`` masks the convolution's *output*, but its
depthwise ``Conv1d`` still reads the padded frames next to the last real frames, and
those frames are not zero (the feed-forward and attention blocks write into them). An
utterance's output then depends on how much padding its batch added: a padded batch
and the same utterance alone give different gradients, and per-example clipping would
clip the wrong gradient. Zeroing the padded frames right before the depthwise
convolution makes every utterance independent of its batch's padding (tested against
unpadded single examples).
"""
from __future__ import annotations

import torch
from speechbrain.lobes.models.transformer.Conformer import ConvolutionModule


class PaddingSafeConvolutionModule(ConvolutionModule):
    """``ConvolutionModule`` that zeroes padded frames before the depthwise convolution.

    Only the full-utterance path changes; dynamic-chunk training keeps SpeechBrain's code.
    """

    def forward(self, x, mask=None, dynchunktrain_config=None):
        if dynchunktrain_config is not None or mask is None:
            return super().forward(x, mask, dynchunktrain_config)
        out = self.bottleneck(self.layer_norm(x).transpose(1, 2))  # [B, C, T]
        out = out.masked_fill(mask.transpose(1, 2), 0.0)  # mask: [B, T, 1], True on padding
        out = self.conv(out)
        if self.causal:
            out = out[..., : -self.padding]
        out = self.after_conv(out.transpose(1, 2))
        return out.masked_fill(mask, 0.0)


def make_conformer_padding_safe(encoder: torch.nn.Module) -> torch.nn.Module:
    """Switch every ``ConvolutionModule`` inside ``encoder`` to the padding-safe one, in place.

    Parameters and state dicts are unchanged, so checkpoints stay compatible.
    """
    for module in encoder.modules():
        if type(module) is ConvolutionModule:
            module.__class__ = PaddingSafeConvolutionModule
    return encoder
