"""Named model sizes and :func:`build_model`.

=====  =======  ======  =====  =====  ======  ===========  ==============================
name   d_model  layers  heads  d_ffn  kernel  predictor    published size (transducer)
=====  =======  ======  =====  =====  ======  ===========  ==============================
tiny   64       2       4      256    15      64           smoke tests only
mini   144      4       4      576    15      320          (2-CPU experiments)
S      144      16      4      576    31      320          10.3 M  (Gulati et al. 2020)
M      256      16      4      1024   31      640          30.7 M  (Gulati et al. 2020)
L      512      17      8      2048   31      640          118.8 M (Gulati et al. 2020)
XL     1024     24      8      4096   5       640          0.6 B   (Zhang et al. 2020, "Pushing
                                                           the limits..."; the BEST-RQ /
                                                           w2v-BERT XL encoder)
=====  =======  ======  =====  =====  ======  ===========  ==============================

Gulati et al. use a convolution kernel of 32; SpeechBrain's "same" padding
``(k - 1) // 2`` only keeps the frame count for odd kernels, so S/M/L use 31
(the difference is ``d_model`` weights per layer). The published counts are
for transducers with a single-layer LSTM prediction network (320 / 640 units)
and a ~1k word-piece vocabulary; ``tests/test_models.py`` checks
``build_model(name, 1024, kind="transducer")`` against them within 15 %.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Mapping, Union

from torch import nn

from privasr.models.conformer_ctc import ConformerCTC
from privasr.models.transducer import ConformerTransducer

__all__ = ["SIZES", "PUBLISHED_PARAMS", "MODEL_KINDS", "get_size", "build_model", "count_parameters"]

_ENCODER_KEYS = ("d_model", "num_layers", "nhead", "d_ffn", "kernel_size", "dropout",
                 "n_mels", "subsampling_channels", "subsampling_factor", "spec_augment")
_TRANSDUCER_KEYS = ("pred_dim", "pred_layers", "joint_dim")

SIZES: Dict[str, Dict[str, Any]] = {
    "tiny": dict(d_model=64, num_layers=2, nhead=4, d_ffn=256, kernel_size=15, pred_dim=64),
    "mini": dict(d_model=144, num_layers=4, nhead=4, d_ffn=576, kernel_size=15, pred_dim=320),
    "S": dict(d_model=144, num_layers=16, nhead=4, d_ffn=576, kernel_size=31, pred_dim=320),
    "M": dict(d_model=256, num_layers=16, nhead=4, d_ffn=1024, kernel_size=31, pred_dim=640),
    "L": dict(d_model=512, num_layers=17, nhead=8, d_ffn=2048, kernel_size=31, pred_dim=640),
    "XL": dict(d_model=1024, num_layers=24, nhead=8, d_ffn=4096, kernel_size=5, pred_dim=640),
}

#: Published parameter counts of the Conformer *transducers* (see module doc).
PUBLISHED_PARAMS: Dict[str, float] = {"S": 10.3e6, "M": 30.7e6, "L": 118.8e6, "XL": 600e6}

MODEL_KINDS = {"ctc": ConformerCTC, "transducer": ConformerTransducer}


def get_size(name: str) -> Dict[str, Any]:
    """A copy of the named configuration (raise ``ValueError`` if unknown)."""
    if name not in SIZES:
        raise ValueError(f"unknown model size {name!r}; choose one of {sorted(SIZES)}")
    return copy.deepcopy(SIZES[name])


def build_model(size_or_dict: Union[str, Mapping[str, Any]], vocab_size: int,
                kind: str = "ctc", **overrides: Any) -> nn.Module:
    """Build a Conformer-CTC or Conformer-transducer.

    ``size_or_dict`` is a name from :data:`SIZES` or a dict of constructor
    arguments (e.g. from HyperPyYAML); ``overrides`` replace single entries
    (``dropout=0.0``). Transducer-only keys (``pred_dim``, ``pred_layers``,
    ``joint_dim``) are ignored for ``kind="ctc"``.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {sorted(MODEL_KINDS)}, got {kind!r}")
    config = get_size(size_or_dict) if isinstance(size_or_dict, str) else dict(size_or_dict)
    config.update(overrides)
    unknown = sorted(set(config) - set(_ENCODER_KEYS) - set(_TRANSDUCER_KEYS))
    if unknown:
        raise ValueError(f"unknown model config keys {unknown}; "
                         f"allowed: {sorted(_ENCODER_KEYS + _TRANSDUCER_KEYS)}")
    if kind == "ctc":
        config = {k: v for k, v in config.items() if k not in _TRANSDUCER_KEYS}
    return MODEL_KINDS[kind](vocab_size=vocab_size, **config)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (works on the ``meta`` device)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
