"""The acoustic encoder shared by every privasr ASR model.

``waveform -> 80-mel fbank -> per-utterance normalization -> 4x conv
subsampling -> Conformer (RelPosMHAXL) -> frames of d_model``

Built from SpeechBrain pieces (``Fbank``, ``ConformerEncoder``,
``RelPosEncXL``, ``SpectrogramDrop``/``Warping``) with three deliberate changes,
all needed so that **per-example gradients** taken with
``torch.func.vmap(torch.func.grad(...))`` over a padded batch equal the
gradients of the unpadded examples one by one:

1. normalization is per utterance, over its valid frames only
   (:class:`UtteranceNorm`); SpeechBrain's ``InputNormalization`` keeps running
   statistics across batches and its ``"sentence"`` mode loops over the batch
   in Python on tensor values, which ``vmap`` cannot trace;
2. the subsampling front end (:class:`Conv2dSubsampling`) zeroes padded frames
   before each convolution, so a valid frame never sees padding;
3. the Conformer convolution module is replaced by
   :class:`MaskedConvolutionModule`, which zeroes padded frames *before* the
   depthwise convolution (SpeechBrain only masks its output, so padding leaks
   ``kernel_size // 2`` frames into the valid region) and avoids the in-place
   ``masked_fill_``.

There is no BatchNorm anywhere (SpeechBrain 1.1.2 already uses LayerNorm in the
Conformer convolution module), and no Python control flow on tensor values.

Lengths follow the SpeechBrain convention: *relative* lengths in ``[0, 1]``.
Every stage converts them to exact absolute counts with
:func:`relative_to_absolute` and back, so ``round(rel * max_len)`` is exact at
each stage (see :meth:`ConformerEncoder.features`).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import List, Optional, Tuple

import torch
from torch import nn
from speechbrain.augment.freq_domain import SpectrogramDrop, Warping
from speechbrain.lobes.features import Fbank
from speechbrain.lobes.models.transformer.Conformer import (
    ConformerEncoder as SBConformerEncoder,
)
from speechbrain.lobes.models.transformer.Conformer import ConvolutionModule
from speechbrain.nnet.activations import Swish
from speechbrain.nnet.attention import RelPosEncXL

from privasr.dp.per_layer import group_parameters_by_layer

__all__ = [
    "relative_to_absolute",
    "padding_mask",
    "UtteranceNorm",
    "Conv2dSubsampling",
    "SUBSAMPLING_FACTORS",
    "MaskedConvolutionModule",
    "build_spec_augment",
    "ConformerEncoder",
    "encoder_param_groups",
]


def relative_to_absolute(rel_lens: torch.Tensor, max_len: int) -> torch.Tensor:
    """Relative lengths ``[B]`` in ``[0, 1]`` -> absolute lengths ``[B]`` (long).

    ``abs = round(rel * max_len)``, the SpeechBrain convention.
    """
    return torch.round(rel_lens * max_len).long()


def padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """Absolute lengths ``[B]`` -> bool mask ``[B, max_len]``, True at padding."""
    steps = torch.arange(max_len, device=lengths.device)
    return steps.unsqueeze(0) >= lengths.unsqueeze(1)


def _conv_out_len(lengths: torch.Tensor, stride: int = 2) -> torch.Tensor:
    """Output length of a ``kernel=3, padding=1`` conv of stride ``s``: ``floor((L - 1) / s) + 1 = ceil(L / s)``."""
    return torch.div(lengths + stride - 1, stride, rounding_mode="floor")


class UtteranceNorm(nn.Module):
    """Mean/variance normalization of each utterance over its valid frames.

    For features ``x[b, t, f]`` with ``n_b`` valid frames::

        mu[b, f]  = sum_{t < n_b} x[b, t, f] / n_b
        var[b, f] = sum_{t < n_b} (x[b, t, f] - mu[b, f])^2 / n_b
        y[b, t, f] = (x[b, t, f] - mu[b, f]) / sqrt(var[b, f] + eps)  (0 at padding)

    No statistics are shared between utterances, nothing is learned, and the
    result is independent of how much padding follows the utterance.
    """

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, T, F]``, ``lengths``: absolute ``[B]`` -> ``[B, T, F]``."""
        valid = (~padding_mask(lengths, x.shape[1])).unsqueeze(-1).to(x.dtype)
        count = valid.sum(dim=1, keepdim=True).clamp(min=1.0)
        mean = (x * valid).sum(dim=1, keepdim=True) / count
        var = (((x - mean) * valid) ** 2).sum(dim=1, keepdim=True) / count
        return (x - mean) / torch.sqrt(var + self.eps) * valid


#: Frame-rate reductions :class:`Conv2dSubsampling` offers (10 ms fbank hop -> 40 or 20 ms frames).
SUBSAMPLING_FACTORS = (4, 2)


class Conv2dSubsampling(nn.Module):
    """Two ``Conv2d(kernel=3, padding=1) + ReLU`` layers, then a linear
    projection: ``[B, T, F] -> [B, T', d_model]``.

    Both convolutions halve the mel axis (``F -> ceil(ceil(F/2)/2)``). In time
    the first always has stride 2 and the second stride 2 (``factor=4``: 40 ms
    frames, ``T' = ceil(ceil(T/2)/2)``) or 1 (``factor=2``: 20 ms frames,
    ``T' = ceil(T/2)``; twice the encoder frames, so a character CTC model
    aligns speech down to ~22 ms a character, e.g. fast canaries at 110 wpm
    x 4; normal-rate speech x 4, 14-19 ms a character, is too fast for
    both). Padded frames are zeroed before each convolution, so valid outputs
    equal those of the unpadded utterance.
    """

    def __init__(self, n_mels: int, d_model: int, channels: Optional[int] = None,
                 dropout: float = 0.0, factor: int = 4):
        super().__init__()
        if factor not in SUBSAMPLING_FACTORS:
            raise ValueError(f"subsampling_factor must be one of {SUBSAMPLING_FACTORS}, got {factor!r}")
        channels = channels or d_model
        self.conv1 = nn.Conv2d(1, channels, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, stride=(factor // 2, 2), padding=1)
        self.activation = nn.ReLU()
        freq_out = (n_mels + 3) // 4  # ceil(ceil(F / 2) / 2)
        self.out = nn.Linear(channels * freq_out, d_model)
        self.dropout = nn.Dropout(dropout)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Absolute input frames ``[B]`` -> absolute output frames ``[B]``."""
        return self._out_len(self.conv2, self._out_len(self.conv1, lengths))

    @staticmethod
    def _out_len(conv: nn.Conv2d, lengths: torch.Tensor) -> torch.Tensor:
        return _conv_out_len(lengths, conv.stride[0])  # the time axis's stride

    @staticmethod
    def _zero_padding(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Zero the time steps ``>= lengths`` of ``x``: ``[B, C, T, F]``."""
        mask = padding_mask(lengths, x.shape[2])[:, None, :, None]
        return x.masked_fill(mask, 0.0)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``x``: ``[B, T, F]``, absolute ``lengths`` ``[B]`` ->
        (``[B, T', d_model]``, absolute ``[B]``)."""
        x = self._zero_padding(x.unsqueeze(1), lengths)
        for conv in (self.conv1, self.conv2):
            lengths = self._out_len(conv, lengths)
            x = self._zero_padding(self.activation(conv(x)), lengths)
        batch, channels, time, freq = x.shape
        x = x.transpose(1, 2).reshape(batch, time, channels * freq)
        return self.dropout(self.out(x)), lengths


class MaskedConvolutionModule(ConvolutionModule):
    """SpeechBrain's Conformer convolution module, padding-exact and vmap-safe.

    ``LayerNorm -> pointwise conv -> GLU -> [zero padding] -> depthwise conv
    -> LayerNorm -> Swish -> pointwise -> Dropout -> [zero padding]``.

    Same parameters (and state-dict keys) as
    :class:`speechbrain.lobes.models.transformer.Conformer.ConvolutionModule`;
    only ``forward`` differs: the padded frames are zeroed before the depthwise
    convolution, and out-of-place ``masked_fill`` replaces ``masked_fill_``.
    """

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                dynchunktrain_config=None) -> torch.Tensor:
        """``x``: ``[B, T, D]``; ``mask``: ``[B, T, 1]``, True at padding."""
        if dynchunktrain_config is not None:
            raise ValueError("MaskedConvolutionModule does not support dynamic chunk training")
        if self.causal:
            raise ValueError("MaskedConvolutionModule supports non-causal convolutions only")
        out = self.bottleneck(self.layer_norm(x).transpose(1, 2))  # [B, D, T]
        if mask is not None:
            out = out.masked_fill(mask.transpose(1, 2), 0.0)
        out = self.after_conv(self.conv(out).transpose(1, 2))  # [B, T, D]
        if mask is not None:
            out = out.masked_fill(mask, 0.0)
        return out


def build_spec_augment(time_warp: int = 5, freq_masks: int = 2, freq_width: int = 27,
                       time_masks: int = 5, time_width: int = 40) -> nn.Sequential:
    """SpecAugment (Park et al. 2019) from SpeechBrain's ``augment.freq_domain``.

    ``Warping(time) -> SpectrogramDrop(freq) -> SpectrogramDrop(time)`` on
    ``[B, T, F]`` features. Set a count or width to 0 to drop that part.
    Random per batch, so apply it to the whole batch *outside* ``vmap``
    (``Warping`` draws one warp point per batch with tensor-valued sizes).
    """
    if min(time_warp, freq_masks, freq_width, time_masks, time_width) < 0:
        raise ValueError("SpecAugment counts and widths must be >= 0")
    parts = []
    if time_warp > 0:
        parts.append(Warping(warp_window=time_warp, dim=1))
    if freq_masks > 0 and freq_width > 0:
        parts.append(SpectrogramDrop(drop_length_low=0, drop_length_high=freq_width,
                                     drop_count_low=freq_masks, drop_count_high=freq_masks,
                                     dim=2))
    if time_masks > 0 and time_width > 0:
        parts.append(SpectrogramDrop(drop_length_low=0, drop_length_high=time_width,
                                     drop_count_low=time_masks, drop_count_high=time_masks,
                                     dim=1))
    return nn.Sequential(*parts)


class ConformerEncoder(nn.Module):
    """Waveforms -> Conformer encoder frames (40 ms, or 20 ms at ``subsampling_factor=2``).

    Arguments
    ---------
    d_model, num_layers, nhead, d_ffn, kernel_size, dropout:
        Conformer hyper-parameters (``kernel_size`` must be odd so that the
        depthwise convolution keeps the length).
    n_mels: mel filters of the fbank front end (25 ms window, 10 ms hop).
    sample_rate: of the input waveforms.
    subsampling_channels: channels of the conv front end (default ``d_model``).
    subsampling_factor: 4 (40 ms frames) or 2 (20 ms), see :class:`Conv2dSubsampling`.
    spec_augment: optional module applied by :meth:`augment` in training mode
        (e.g. :func:`build_spec_augment`); ``None`` disables augmentation.

    Shapes: ``wavs [B, N]``, ``wav_lens [B]`` (relative) ->
    ``enc [B, T, d_model]``, ``enc_lens [B]`` (relative) with
    ``T = ceil(ceil((N // 160 + 1) / 2) / 2)`` at 16 kHz (``ceil((N // 160 + 1) / 2)`` at factor 2).
    """

    def __init__(self, d_model: int, num_layers: int, nhead: int, d_ffn: int,
                 kernel_size: int = 31, dropout: float = 0.1, n_mels: int = 80,
                 sample_rate: int = 16000, subsampling_channels: Optional[int] = None,
                 spec_augment: Optional[nn.Module] = None, subsampling_factor: int = 4):
        super().__init__()
        _check_encoder_config(d_model, num_layers, nhead, d_ffn, kernel_size, dropout, n_mels)
        self.d_model = d_model
        self.hop_length = sample_rate // 100  # 10 ms
        self.fbank = Fbank(sample_rate=sample_rate, n_mels=n_mels, n_fft=400,
                           win_length=25, hop_length=10)
        self.normalize = UtteranceNorm()
        self.spec_augment = spec_augment
        self.subsampling = Conv2dSubsampling(n_mels, d_model, subsampling_channels, dropout,
                                             subsampling_factor)
        self.pos_encoding = RelPosEncXL(d_model)
        self.conformer = SBConformerEncoder(
            num_layers=num_layers, d_model=d_model, d_ffn=d_ffn, nhead=nhead,
            kernel_size=kernel_size, dropout=dropout, attention_type="RelPosMHAXL",
        )
        for layer in self.conformer.layers:
            layer.convolution_module = MaskedConvolutionModule(
                d_model, kernel_size, bias=True, activation=Swish, dropout=dropout)

    @torch.no_grad()
    def features(self, wavs: torch.Tensor, wav_lens: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Normalized log-mel fbanks: ``[B, N]`` -> (``[B, F, n_mels]``, rel ``[B]``).

        The fbank STFT is centred with zero padding, so utterance ``b`` of
        ``L_b = round(wav_lens[b] * N)`` samples has ``L_b // hop + 1`` valid
        frames, exactly as many as when computed alone. Padding is zeroed.
        """
        feats = self.fbank(wavs)
        n_samples = relative_to_absolute(wav_lens, wavs.shape[1])
        n_frames = torch.div(n_samples, self.hop_length, rounding_mode="floor") + 1
        feats = self.normalize(feats, n_frames)
        return feats, n_frames.to(feats.dtype) / feats.shape[1]

    def augment(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> torch.Tensor:
        """Apply SpecAugment to a batch when training (identity otherwise).

        Call it on the whole batch, outside any ``vmap``; padding stays zero.
        ``feats`` is not modified (SpeechBrain's ``SpectrogramDrop`` works in
        place, so it gets a copy).
        """
        if not self.training or self.spec_augment is None:
            return feats
        feats = self.spec_augment(feats.clone())
        n_frames = relative_to_absolute(feat_lens, feats.shape[1])
        return feats.masked_fill(padding_mask(n_frames, feats.shape[1]).unsqueeze(-1), 0.0)

    def encode(self, feats: torch.Tensor, feat_lens: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Features ``[B, F, n_mels]`` (rel lens) -> (``[B, T, d_model]``, rel ``[B]``)."""
        n_frames = relative_to_absolute(feat_lens, feats.shape[1])
        x, out_frames = self.subsampling(feats, n_frames)
        pad = padding_mask(out_frames, x.shape[1])
        x, _ = self.conformer(x, src_key_padding_mask=pad, pos_embs=self.pos_encoding(x))
        return x, out_frames.to(x.dtype) / x.shape[1]

    def forward(self, wavs: torch.Tensor, wav_lens: torch.Tensor, augment: bool = False
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Waveforms ``[B, N]`` (rel lens) -> (``[B, T, d_model]``, rel ``[B]``)."""
        feats, feat_lens = self.features(wavs, wav_lens)
        if augment:
            feats = self.augment(feats, feat_lens)
        return self.encode(feats, feat_lens)


def encoder_param_groups(model: nn.Module) -> "OrderedDict[str, List[str]]":
    """Group parameter names by layer, in forward order, under short names.

    The groups are those of :data:`privasr.dp.per_layer.LAYER_REGEX` (the one layer grouping, which
    per-layer clipping and layer freezing use on the Brain's names), renamed for the model alone:
    ``frontend`` (``encoder.subsampling``), ``layer.0`` ... ``layer.{L-1}`` (the Conformer blocks
    ``encoder.conformer.layers.<i>``), ``final_norm`` (``encoder.conformer.norm``), then the head
    (``ctc_head``) or the other top-level children (``predictor``, ``joint``) under their own names.
    Every parameter belongs to exactly one group; names are those of ``model.named_parameters()``
    (usable with ``torch.func.functional_call``).
    """
    groups = group_parameters_by_layer(model.named_parameters())
    return OrderedDict((_short_group_name(path), names) for path, names in groups.items())


def _short_group_name(path: str) -> str:
    """``encoder.subsampling`` -> ``frontend``, ``encoder.conformer.layers.3`` -> ``layer.3``,
    ``encoder.conformer.norm`` -> ``final_norm``; any other group keeps its module path."""
    block = re.fullmatch(r"encoder\.conformer\.layers\.(\d+)", path)
    if block:
        return f"layer.{block.group(1)}"
    return {"encoder.subsampling": "frontend", "encoder.conformer.norm": "final_norm"}.get(path, path)


def _check_encoder_config(d_model, num_layers, nhead, d_ffn, kernel_size, dropout, n_mels):
    """Raise one clear ``ValueError`` for an impossible encoder configuration."""
    for name, value in (("d_model", d_model), ("num_layers", num_layers), ("nhead", nhead),
                        ("d_ffn", d_ffn), ("kernel_size", kernel_size), ("n_mels", n_mels)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if d_model % nhead:
        raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
    if d_model % 2:
        raise ValueError(f"d_model must be even (sinusoidal relative positions), got {d_model}")
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd to keep the frame count, got {kernel_size}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
