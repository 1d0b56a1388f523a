r"""Per-core clipping and cross-core aggregation: the reference implementation.

In data-parallel training each of the :math:`C` cores computes the mean gradient
:math:`\bar g_c` of its shard. The strategies differ in what they do before the
cross-core reduction (Wang et al., *Per-core clipping*, Algorithm 1):

``none``
    :math:`g = \frac1C \sum_c \bar g_c` (what DDP does).
``global``
    ``none``, then :math:`g \leftarrow g \cdot \min(1, b / \lVert g \rVert)` with the
    norm over *all* parameters (SpeechBrain 1.1.2 clips only ``param_groups[0]``).
``pcc``
    :math:`\hat g_c = \bar g_c \cdot \min(1, b / \lVert \bar g_c \rVert)`.
``apcc``
    :math:`b_t = \min_c \lVert \bar g_c \rVert` over cores whose norm is finite and
    non-zero, :math:`\hat g_c = \bar g_c \cdot b_t / \lVert \bar g_c \rVert`; every
    clipped core then has norm exactly :math:`b_t`.

``reduction="mean"`` divides :math:`\sum_c \hat g_c` by the number of cores that took
part; ``"sum"`` is the paper's Algorithm 1 (equal to ``mean`` with the learning rate
multiplied by :math:`C`).

Fault handling: a core whose gradient holds a NaN or Inf is dropped from the step and
the mean is over the remaining cores; if none remains the step must be skipped
(:attr:`AggregationStats.skipped`). A zero-norm core contributes zero and never sets
the APCC bound.

This module is the slow, obvious reference. The fast paths
(:mod:`privasr.distributed`, :mod:`privasr.per_sample`) share only
:func:`clip_factors` with it and are tested against :func:`clip_and_aggregate`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

METHODS = ("none", "global", "pcc", "apcc")
REDUCTIONS = ("mean", "sum")

GradList = Sequence[Optional[torch.Tensor]]


@dataclass
class AggregationStats:
    """What one aggregation step did, for logging and for the training loop.

    Attributes:
        core_norms: L2 norm of each core's gradient over all parameters, shape ``[C]``.
        factors: the multiplier applied to each core (0 for dropped cores).
        bound: the bound in force (``b`` for pcc/global, ``b_t`` for apcc, else None).
        dropped: indices of cores dropped for non-finite gradients.
        skipped: True when no core remained, so the optimizer must not step.
        global_factor: the factor of ``global`` clipping on the aggregate (1 otherwise).
    """

    core_norms: torch.Tensor
    factors: torch.Tensor
    bound: Optional[float]
    dropped: list = field(default_factory=list)
    skipped: bool = False
    global_factor: float = 1.0

    @property
    def num_cores(self) -> int:
        return int(self.core_norms.numel())

    @property
    def clipped_fraction(self) -> float:
        """Fraction of the surviving cores whose gradient was shrunk (factor < 1)."""
        return clipped_fraction(self.core_norms, self.factors)


def shrunk_cores(norms: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Mask of the cores that clipping shrank: finite, non-zero norm, factor < 1 (dropped cores are not)."""
    return (factors < 1.0) & torch.isfinite(norms) & (norms > 0)


def clipped_fraction(norms: torch.Tensor, factors: torch.Tensor) -> float:
    """Fraction of the surviving (finite-norm) cores that clipping shrank; 0 when none survived."""
    kept = torch.isfinite(norms)
    if not kept.any():
        return 0.0
    return float(shrunk_cores(norms, factors).sum()) / float(kept.sum())


def check_method(method: str, bound: Optional[float], reduction: str = "mean") -> None:
    """Raise ValueError, naming what is accepted, on a bad strategy configuration."""
    if method not in METHODS:
        raise ValueError(f"unknown clipping method {method!r}; accepted: {', '.join(METHODS)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; accepted: {', '.join(REDUCTIONS)}")
    if method in ("pcc", "global"):
        if bound is None:
            raise ValueError(f"method {method!r} needs a clipping bound (a positive float)")
        if not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 0):
            raise ValueError(f"clipping bound must be a positive finite float, got {bound!r}")


def clip_factors(norms: torch.Tensor, method: str, bound: Optional[float]) -> tuple[torch.Tensor, Optional[float]]:
    r"""Per-core multipliers :math:`\hat g_c = f_c \bar g_c` given the per-core norms.

    Non-finite cores get :math:`f_c = 0` (dropped). For ``apcc``, zero-norm cores get
    0 as well (they contribute zero either way) and do not set :math:`b_t`.

    Returns:
        ``(factors, bound_in_force)``; ``bound_in_force`` is ``b_t`` for apcc (None if no
        core has a finite non-zero norm), ``bound`` for pcc/global, None for none.
    """
    norms = norms.to(torch.float64)
    finite = torch.isfinite(norms)
    positive = finite & (norms > 0)
    ones = torch.where(finite, 1.0, 0.0).to(torch.float64)
    if method in ("none", "global"):
        return ones, (float(bound) if method == "global" else None)
    safe = torch.where(positive, norms, torch.ones_like(norms))
    if method == "pcc":
        factors = torch.where(positive, torch.clamp(bound / safe, max=1.0), ones)
        return factors, float(bound)
    if method == "apcc":
        if not positive.any():
            return torch.zeros_like(norms), None
        b_t = float(norms[positive].min())
        return torch.where(positive, b_t / safe, torch.zeros_like(norms)), b_t
    raise ValueError(f"unknown clipping method {method!r}; accepted: {', '.join(METHODS)}")


def global_clip_factor(total_norm: float, max_norm: float) -> float:
    r""":math:`\min(1, b / \lVert g \rVert)`, 1 for a zero norm."""
    if total_norm <= max_norm or total_norm == 0.0:
        return 1.0
    return max_norm / total_norm


def _check_shapes(per_core_grads: Sequence[GradList]) -> None:
    if len(per_core_grads) == 0:
        raise ValueError("per_core_grads is empty; expected at least one core")
    reference = per_core_grads[0]
    for c, grads in enumerate(per_core_grads):
        if len(grads) != len(reference):
            raise ValueError(
                f"core {c} has {len(grads)} parameters but core 0 has {len(reference)}; "
                "every core must list the same parameters"
            )
        for p, (g, g0) in enumerate(zip(grads, reference)):
            if g is not None and g0 is not None and g.shape != g0.shape:
                raise ValueError(
                    f"core {c} parameter {p} has shape {tuple(g.shape)} but core 0 has "
                    f"{tuple(g0.shape)}; shapes must match across cores"
                )


def core_norms(stacked_grads: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    r"""L2 norms of ``K`` cores, ``stacked_grads[p]`` of shape ``[K, *param.shape]`` (or None): float64 ``[K]``.

    :math:`\lVert \bar g_c \rVert = \sqrt{\sum_p \lVert \bar g_{c,p} \rVert^2}`: each parameter's norms are
    taken in its gradient's own precision (float32 at least: bf16/fp16 are widened), so no float64
    copy of a gradient is made (it cost 9 % of a PCC step with 8 cores), and combined over the
    parameters in float64. A NaN/Inf entry gives a NaN/Inf norm (the core is then dropped).
    """
    present = [g for g in stacked_grads if g is not None]
    if not present:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack([parameter_norms(g) for g in present]).pow(2).sum(0).sqrt()


def parameter_norms(stacked_grad: torch.Tensor) -> torch.Tensor:
    """One parameter's term of :func:`core_norms`: the ``K`` norms of ``[K, *param.shape]``, float64 ``[K]``,
    taken in the gradient's own precision (float32 at least)."""
    g = stacked_grad.detach().reshape(stacked_grad.shape[0], -1)
    wide = None if g.dtype in (torch.float32, torch.float64) else torch.float32
    return torch.linalg.vector_norm(g, dim=1, dtype=wide).to(torch.float64)


def core_norm(grads: GradList) -> torch.Tensor:
    """L2 norm of one core's gradient over all its parameters (see :func:`core_norms`); 0 without any."""
    norms = core_norms([None if g is None else g.unsqueeze(0) for g in grads])
    return norms[0] if norms.numel() else torch.zeros((), dtype=torch.float64)


def aggregate(
    per_core_grads: Sequence[GradList],
    method: str,
    bound: Optional[float] = None,
    reduction: str = "mean",
) -> tuple[list[Optional[torch.Tensor]], AggregationStats]:
    """Clip each core's gradient and reduce across cores; also return what was done.

    See :func:`clip_and_aggregate` for the arguments. A parameter whose gradient is None
    on every core stays None; None on some cores only counts as zero there.
    """
    check_method(method, bound, reduction)
    _check_shapes(per_core_grads)
    norms = torch.stack([core_norm(grads) for grads in per_core_grads])
    factors, bound_t = clip_factors(norms, method, bound)
    kept = [c for c in range(len(per_core_grads)) if torch.isfinite(norms[c])]
    dropped = [c for c in range(len(per_core_grads)) if c not in kept]
    num_params = len(per_core_grads[0])
    out: list[Optional[torch.Tensor]] = []
    for p in range(num_params):
        present = [per_core_grads[c][p] for c in range(len(per_core_grads)) if per_core_grads[c][p] is not None]
        if not present:
            out.append(None)
            continue
        total = torch.zeros_like(present[0], dtype=torch.float64)
        for c in kept:  # dropped cores are left out, never multiplied (0 * NaN = NaN)
            g = per_core_grads[c][p]
            if g is not None:
                total += factors[c] * g.to(torch.float64)
        if reduction == "mean" and kept:
            total /= len(kept)
        out.append(total)
    stats = AggregationStats(norms, factors, bound_t, dropped, skipped=not kept)
    if method == "global" and kept:
        stats.global_factor = global_clip_factor(float(core_norm(out)), float(bound))
        out = [None if g is None else g * stats.global_factor for g in out]
    dtype_of = [next((grads[p] for grads in per_core_grads if grads[p] is not None), None) for p in range(num_params)]
    out = [None if g is None else g.to(ref.dtype) for g, ref in zip(out, dtype_of)]
    return out, stats


def clip_and_aggregate(
    per_core_grads: Sequence[GradList],
    method: str,
    bound: Optional[float] = None,
    reduction: str = "mean",
) -> list[Optional[torch.Tensor]]:
    """Clip per-core gradients and reduce them across cores (reference implementation).

    Args:
        per_core_grads: ``per_core_grads[c][p]`` is core ``c``'s gradient of parameter
            ``p`` (a tensor, or None for a parameter without gradient, which stays None).
        method: one of ``none``, ``global``, ``pcc``, ``apcc``.
        bound: the clipping bound ``b`` for ``pcc``, the max global norm for ``global``.
        reduction: ``mean`` (default) or ``sum`` (the paper's Algorithm 1).

    Returns:
        The aggregated gradient, one entry per parameter. When every core is non-finite
        the result is all zeros and :func:`aggregate` reports ``skipped=True``.

    Raises:
        ValueError: unknown method or reduction, missing or non-positive bound,
            cores with mismatched parameter lists or shapes.
    """
    return aggregate(per_core_grads, method, bound, reduction)[0]
