"""The pre-trained encoder: build it from a named size, export it, load it into an ASR model.

Pre-training trains a bare :class:`privasr.models.encoder.ConformerEncoder` (inside
:class:`privasr.models.bestrq.BestRQ`); fine-tuning loads its ``state_dict`` into the
``encoder`` of a :class:`privasr.models.ConformerCTC` (or transducer) of the same size.
The YAML of a fine-tuning recipe needs no code for it::

    pretrained_encoder: !ref <pretrain_folder>/encoder.ckpt     # null: from scratch
    __load_encoder: !apply:privasr.ssl.load_pretrained_encoder [!ref <model>, !ref <pretrained_encoder>]

A resumed fine-tuning run then restores its own checkpoint over these weights.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch
from torch import nn

from privasr.models.encoder import ConformerEncoder
from privasr.models.sizes import get_size

__all__ = ["build_encoder", "export_encoder", "load_pretrained_encoder"]

logger = logging.getLogger(__name__)

_NOT_ENCODER = ("pred_dim", "pred_layers", "joint_dim")


def build_encoder(size: str, dropout: float = 0.1, **overrides: Any) -> ConformerEncoder:
    """A :class:`ConformerEncoder` of a named size of :data:`privasr.models.SIZES` (no head)."""
    config = {k: v for k, v in get_size(size).items() if k not in _NOT_ENCODER}
    config.update(dropout=dropout, **overrides)
    return ConformerEncoder(**config)


def export_encoder(encoder: nn.Module, path: str) -> str:
    """Write ``encoder.state_dict()`` to ``path`` atomically; returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(encoder.state_dict(), tmp)
    os.replace(tmp, path)
    return path


def load_pretrained_encoder(model: nn.Module, path: Optional[str], attribute: str = "encoder") -> nn.Module:
    """Load an exported encoder into ``model.<attribute>``; ``path=None`` keeps the random init.

    Every parameter of the target encoder must be in the file with the same shape (buffers
    such as positional tables may be absent); a mismatch is one clear ``ValueError``.
    Returns ``model`` (so it can be used inside HyperPyYAML).
    """
    if path is None or path == "":
        logger.info("no pre-trained encoder: training from scratch")
        return model
    if not os.path.isfile(path):
        raise ValueError(f"pre-trained encoder not found: {path} (run the pre-training stage first)")
    encoder = getattr(model, attribute, None)
    if not isinstance(encoder, nn.Module):
        raise ValueError(f"model has no encoder module {attribute!r} to load {path} into")
    state = torch.load(path, map_location="cpu")
    own = encoder.state_dict()
    shapes = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and v.shape != own[k].shape}
    missing = [n for n, _ in encoder.named_parameters() if n not in state]
    if shapes or missing:
        detail = f"shape mismatch {next(iter(shapes.items()))}" if shapes else f"missing {missing[0]!r}"
        raise ValueError(f"{path} does not fit the model's encoder ({detail}); pre-train and fine-tune the same size")
    encoder.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    logger.info("loaded the pre-trained encoder %s (%d tensors)", path, len(state))
    return model
