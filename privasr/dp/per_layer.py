r"""Per-layer (group-wise) clipping of per-example gradients.

The parameters are split into :math:`K` groups (one per Conformer block, plus the
front-end, the final norm and the head: :data:`LAYER_REGEX`). Example :math:`i`'s gradient restricted to group :math:`k`,
:math:`g_{i,k}`, is clipped to its own bound :math:`C_k`:

.. math::

    \bar g_{i,k} = g_{i,k} \cdot \min\Big(1, \frac{C_k}{\|g_{i,k}\|_2 + 10^{-6}}\Big).

If :math:`\sum_k C_k^2 = C^2` the whole clipped example has
:math:`\|\bar g_i\|_2^2 = \sum_k \|\bar g_{i,k}\|^2 \le C^2`: the sensitivity is still
:math:`C` and the DP noise stays :math:`\sigma C`. Two allocations (paper, §4.2.2):

* ``uniform``: :math:`C_k = C / \sqrt{K}`;
* ``dim``:     :math:`C_k = C \sqrt{D_k / D}`, :math:`D_k` the parameter count of group
  :math:`k` and :math:`D = \sum_k D_k` (the paper's better variant);
* ``flat``:    one group, :math:`C_1 = C` (ordinary DP-SGD clipping).

Examples whose gradient is not finite are dropped (they contribute zero) and counted.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence, Tuple, Union

import torch

from privasr.clipping import clip_factors

CLIP_MODES = ("flat", "uniform", "dim")

#: The one default layer grouping (per-layer clipping, LayerFreeze, DP-SGD's ``layer_regex``):
#: each Conformer block (SpeechBrain's ConformerEncoder names them ``layers.0``, ``layers.1``, ...),
#: the conv front end (``subsampling``), the final norm (``conformer.norm``) and each head
#: (``head``, ``ctc_head``, ...) is one layer, named by its module path. A name matching none of
#: them falls back to its top-level module. Under a Brain every name starts with the ``modules``
#: key, so the front end, the final norm and the head need their own alternatives: with
#: ``layers.<i>`` alone they would all fall back to one group, ``bestrq`` (or ``model``).
#: The models' ``param_groups()`` (:func:`privasr.models.encoder.encoder_param_groups`) are these
#: groups under short names (``frontend``, ``layer.<i>``, ``final_norm``, ``ctc_head``).
LAYER_REGEX = r"^(.*?\blayers\.\d+|.*?\bsubsampling|.*?\bconformer\.norm|.*?\w*head)\."


def _group_name(name: str, depth_or_regex: Union[int, str, "re.Pattern"]) -> str:
    parts = name.split(".")
    if isinstance(depth_or_regex, int):
        return ".".join(parts[: min(depth_or_regex, len(parts) - 1) or 1])
    match = re.search(depth_or_regex, name)
    if match is None:  # front-end, final norm, head...: its top-level module
        return parts[0] if len(parts) > 1 else name
    return match.group(1) if match.re.groups else match.group(0)


def group_parameters_by_layer(
    named_parameters: Iterable[Tuple[str, torch.nn.Parameter]],
    depth_or_regex: Union[int, str, "re.Pattern", None] = None,
) -> Dict[str, List[str]]:
    r"""Group parameter names into layers, in order of first appearance.

    Args:
        named_parameters: e.g. ``model.named_parameters()`` (pass only trainable ones
            if the groups are used for clipping bounds).
        depth_or_regex:
            * ``None`` (default): :data:`LAYER_REGEX` -- ``encoder.layers.3.ffn.w`` goes to
              ``encoder.layers.3``, ``encoder.subsampling.conv1.weight`` to
              ``encoder.subsampling``, ``encoder.conformer.norm.norm.weight`` to
              ``encoder.conformer.norm``, ``model.ctc_head.bias`` to ``model.ctc_head``; any
              other name goes to its top-level module (``frontend.weight`` to ``frontend``).
            * an ``int`` :math:`d \ge 1`: the first :math:`d` dotted components (never the
              full name of a parameter, so a module's weight and bias stay together).
            * a regex: the group is its first capture group (or whole match); names it
              does not match go to their top-level module.

    Returns:
        ``{group name: [parameter names]}``.
    """
    if depth_or_regex is None:
        depth_or_regex = LAYER_REGEX
    if isinstance(depth_or_regex, bool) or not isinstance(depth_or_regex, (int, str, re.Pattern)):
        raise ValueError(f"depth_or_regex must be None, an int >= 1 or a regex, got {depth_or_regex!r}")
    if isinstance(depth_or_regex, int) and depth_or_regex < 1:
        raise ValueError(f"depth_or_regex as a depth must be >= 1, got {depth_or_regex!r}")
    groups: Dict[str, List[str]] = {}
    for name, _ in named_parameters:
        groups.setdefault(_group_name(name, depth_or_regex), []).append(name)
    return groups


def layer_bounds(max_norm: float, group_sizes: Sequence[int], mode: str = "dim") -> List[float]:
    r"""Per-group bounds :math:`C_k` with :math:`\sum_k C_k^2 = C^2`.

    Args:
        max_norm: the total bound :math:`C > 0`.
        group_sizes: :math:`D_k`, the parameter count of each group (all :math:`> 0`).
        mode: ``"uniform"`` (:math:`C/\sqrt K`), ``"dim"`` (:math:`C\sqrt{D_k/D}`) or
            ``"flat"`` (only valid with a single group).
    """
    if mode not in CLIP_MODES:
        raise ValueError(f"mode must be one of {CLIP_MODES}, got {mode!r}")
    if not max_norm > 0.0:
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
    if not group_sizes or any(int(d) != d or d < 1 for d in group_sizes):
        raise ValueError(f"group_sizes must be a non-empty list of integers >= 1, got {group_sizes!r}")
    k, total = len(group_sizes), sum(group_sizes)
    if mode == "flat":
        if k != 1:
            raise ValueError(f"mode 'flat' takes exactly one group, got {k}; use 'uniform' or 'dim'")
        return [float(max_norm)]
    if mode == "uniform":
        return [max_norm / math.sqrt(k)] * k
    return [max_norm * math.sqrt(d / total) for d in group_sizes]


@dataclass
class ClipResult:
    r"""Output of :func:`clip_per_layer`.

    Attributes:
        summed: per parameter, :math:`\sum_i \bar g_i` (shape of the parameter).
        num_kept: examples that contributed.
        num_dropped: examples dropped for a non-finite gradient.
        clipped_fraction: per group, the fraction of kept examples that were clipped.
    """

    summed: List[torch.Tensor]
    num_kept: int
    num_dropped: int
    clipped_fraction: List[float]


def _finite_examples(per_example: Sequence[torch.Tensor]) -> torch.Tensor:
    finite = torch.ones(per_example[0].shape[0], dtype=torch.bool, device=per_example[0].device)
    for g in per_example:
        finite &= torch.isfinite(g.reshape(g.shape[0], -1)).all(dim=1)
    return finite


def group_factors(sq_norms: torch.Tensor, finite: torch.Tensor, bounds: Sequence[float]
                  ) -> Tuple[torch.Tensor, List[float]]:
    r"""The clip factors of every (group, example): the one rule of per-layer clipping.

    .. math::

        f_{k,i} = \mathbb{1}[i \text{ finite}] \cdot \min\Big(1, \frac{C_k}{\|g_{i,k}\|_2}\Big)
        \quad (f_{k,i} = 1 \text{ at zero norm}),

    per group exactly :func:`privasr.clipping.clip_factors` with ``pcc`` (the rule of per-example
    and per-core clipping: one rule, no epsilon; Opacus adds 1e-6 to the norm, which changes
    a factor by at most 1e-6 / ||g|| relative and is not needed for safety here).

    Args:
        sq_norms: ``[K, B]`` squared group norms :math:`\|g_{i,k}\|^2` (float64; zeros for
            non-finite examples, whose factor is 0 whatever their norm).
        finite: ``[B]`` bool, the examples whose gradient is finite.
        bounds: :math:`C_k`, ``K`` of them.

    Returns:
        ``(factors [K, B] float64, clipped_fraction)``: per group, the fraction of the finite
        examples that were clipped (:math:`\|g_{i,k}\| > C_k`).
    """
    if sq_norms.dim() != 2 or sq_norms.shape[0] != len(bounds) or finite.shape != sq_norms.shape[1:]:
        raise ValueError(f"sq_norms must be [groups={len(bounds)}, examples] and finite [examples], got "
                         f"{tuple(sq_norms.shape)} and {tuple(finite.shape)}")
    norms = sq_norms.to(torch.float64).sqrt()
    bound = torch.tensor(list(bounds), dtype=torch.float64, device=norms.device).unsqueeze(1)
    factors = torch.stack([clip_factors(row, "pcc", float(b))[0] for row, b in zip(norms, bounds)]) * finite
    kept = int(finite.sum())
    clipped = ((norms > bound) & finite).sum(dim=1).double() / max(kept, 1)
    return factors, clipped.tolist()


def clip_per_layer(
    per_example: Sequence[torch.Tensor],
    group_of: Sequence[int],
    bounds: Sequence[float],
) -> ClipResult:
    r"""Clip each example group-wise to ``bounds`` and sum over examples.

    Args:
        per_example: one tensor ``[B, *param_shape]`` per parameter.
        group_of: for each parameter, the index :math:`k` of its group.
        bounds: :math:`C_k` for each group (see :func:`layer_bounds`).

    Returns:
        :class:`ClipResult`; its ``summed`` is safe at zero norms (an all-zero example
        stays zero) and excludes non-finite examples.
    """
    if len(per_example) == 0 or len(per_example) != len(group_of):
        raise ValueError(f"need one group index per gradient tensor: {len(per_example)} tensors, "
                         f"{len(group_of)} indices (and at least one)")
    if any(not 0 <= k < len(bounds) for k in group_of):
        raise ValueError(f"group indices must lie in [0, {len(bounds)}), got {sorted(set(group_of))}")
    batch = per_example[0].shape[0]
    if any(g.shape[0] != batch for g in per_example):
        raise ValueError("every per-example gradient must have the same batch size (dim 0)")
    finite = _finite_examples(per_example)
    grads = [torch.where(finite.view(-1, *[1] * (g.dim() - 1)), g, torch.zeros_like(g)) for g in per_example]
    sq = torch.zeros(len(bounds), batch, dtype=torch.float64, device=grads[0].device)
    for g, k in zip(grads, group_of):
        sq[k] += g.reshape(batch, -1).double().pow(2).sum(dim=1)
    factors, clipped = group_factors(sq, finite, bounds)
    summed = [torch.einsum("b,b...->...", factors[k].to(g.dtype), g) for g, k in zip(grads, group_of)]
    kept = int(finite.sum())
    return ClipResult(summed, kept, batch - kept, clipped)


class PerLayerClipper:
    r"""Per-layer clipping set up once for a model's trainable parameters.

    Args:
        named_parameters: e.g. ``model.named_parameters()``; parameters with
            ``requires_grad=False`` (frozen) are left out of groups and bounds, so build
            the clipper *after* freezing.
        max_norm: total bound :math:`C`.
        mode: ``"flat"``, ``"uniform"`` or ``"dim"``.
        depth_or_regex: grouping, see :func:`group_parameters_by_layer` (ignored for ``flat``).

    Calling it with the per-example gradients of :attr:`names` (in that order) returns
    a :class:`ClipResult`.
    """

    def __init__(self, named_parameters, max_norm: float, mode: str = "dim",
                 depth_or_regex: Union[int, str, None] = None):
        trainable = [(n, p) for n, p in named_parameters if p.requires_grad]
        if not trainable:
            raise ValueError("named_parameters must contain at least one trainable parameter, got none")
        if mode == "flat":
            self.groups = {"all": [n for n, _ in trainable]}
        else:
            self.groups = group_parameters_by_layer(trainable, depth_or_regex)
        numel = {n: p.numel() for n, p in trainable}
        self.names: List[str] = [n for n, _ in trainable]
        index = {n: k for k, members in enumerate(self.groups.values()) for n in members}
        self.group_of: List[int] = [index[n] for n in self.names]
        self.sizes: List[int] = [sum(numel[n] for n in members) for members in self.groups.values()]
        self.bounds: List[float] = layer_bounds(max_norm, self.sizes, mode)
        self.max_norm, self.mode = float(max_norm), mode

    def __call__(self, per_example: Sequence[torch.Tensor]) -> ClipResult:
        return clip_per_layer(per_example, self.group_of, self.bounds)

    def factors_from_sq_norms(self, sq_norms: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, List[float]]:
        r"""Clip factors from per-parameter squared norms, without per-example gradients.

        Args:
            sq_norms: ``{name: [B]}`` :math:`\|\nabla_{\theta_p} \ell_i\|^2` for every name of
                :attr:`names` (e.g. :attr:`privasr.ghost.GhostPass.sq_norms`).

        Returns:
            ``(factors [K, B] float64, finite [B] bool, clipped_fraction)``: group :math:`k`'s
            squared norm is the sum of its parameters' (:math:`\|g_{i,k}\|^2 =
            \sum_{p \in k} \|g_{i,p}\|^2`), the factors those of :func:`group_factors`. An
            example with a non-finite squared norm in any parameter is dropped (factor 0 in every
            group), as :func:`clip_per_layer` drops an example with a non-finite gradient entry.
        """
        missing = [n for n in self.names if n not in sq_norms]
        if missing:
            raise ValueError(f"sq_norms lacks {len(missing)} trained parameter(s) of the clipper, e.g. "
                             f"{missing[0]!r}: build both from the same (frozen-after) model")
        per_parameter = torch.stack([sq_norms[n] for n in self.names]).to(torch.float64)  # [P, B]
        sq = per_parameter.new_zeros(len(self.bounds), per_parameter.shape[1])
        sq.index_add_(0, torch.tensor(self.group_of, device=sq.device), per_parameter)  # one op, not one per parameter
        finite = torch.isfinite(sq).all(dim=0)
        sq = torch.where(finite, sq, torch.zeros((), dtype=sq.dtype, device=sq.device))
        factors, clipped = group_factors(sq, finite, self.bounds)
        return factors, finite, clipped

    def __repr__(self) -> str:
        return f"PerLayerClipper(mode={self.mode!r}, max_norm={self.max_norm:g}, groups={len(self.groups)})"
