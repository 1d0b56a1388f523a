r"""One ghost pass: the forward under the recorder, one backward, the per-unit norms and what the clipped sum needs.

:func:`ghost_pass` runs ``loss_fn`` once under :class:`privasr.ghost.recorder._Recorder` and takes
one backward of :math:`\sum_i \ell_i` (or of the scalar sum over units of their losses) to the
taps' anchor. Each trainable parameter's squared norms per unit, :math:`\lVert \nabla_p \ell_k
\rVert^2` (float64), are formed as the backward reaches its layers; a unit's norm is

.. math::
    \lVert \nabla \ell_k \rVert = \Big(\sum_p \lVert \nabla_p \ell_k \rVert^2\Big)^{1/2},

per-parameter squares combined in float64, as :func:`privasr.clipping.core_norms` does.
:class:`GhostPass` keeps what the book-keeping clipped sum
:math:`\sum_{k \in \text{keep}} w_k \nabla \ell_k` needs (:meth:`GhostPass.weighted_sum`).

Parameters the recorder cannot cover (an unknown use, no single batch axis, never seen) fall
back, for those parameters only, to exact per-unit gradients by ``vmap``
(:func:`privasr.per_sample.shard_grads_vmap` with the other parameters frozen), with one logged
note per set of names.

What is kept until the clipped sum is what it needs, per layer: the per-unit gradients of
materialized layers (LayerNorm, biases, the depthwise and front-end convolutions), and ``a`` with
``g`` of ghost-form layers (their weighted sum is one product, :math:`\sum_i f_i g_i^\top a_i`, of
the size of an ordinary weight gradient). ``keep_pieces=False`` keeps nothing: norms only.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from privasr.ghost.pieces import _PIECES, _keep_rows, sq_norms_of
from privasr.ghost.recorder import _Recorder
from privasr.per_sample import shard_grads_vmap, trainable_parameters

logger = logging.getLogger("privasr.ghost")  # the package's name, as before the split into modules

LossFn = Callable[..., torch.Tensor]
_noted: set = set()  # fallback sets already logged (one note per set, not one per step)


@dataclass
class GhostPass:
    """The recorded forward and backward of one batch: per-unit squared norms and clipped sums.

    Attributes:
        names: trainable parameter names, in :func:`privasr.per_sample.trainable_parameters` order.
        sq_norms: ``name -> [K]`` float64 squared norm of each unit's gradient of that parameter.
        losses: what ``loss_fn`` returned (detached).
        fallback: ``name -> reason`` of the parameters whose per-unit gradients were materialized
            by vmap.
        pieces: ``name -> [piece]``, what the clipped sum needs (empty with ``keep_pieces=False``):
            per-unit gradients ``[K, numel]`` (or a materialized :class:`_Seq` / :class:`_Conv`), or
            a ghost-form layer's recorded input and output gradient.
        recorded: ``name -> parameter`` of the parameters a recorded call used (a use whose output
            got no gradient adds zero).
        kinds: ``name -> layer type`` of every trainable parameter: the recorded uses' types
            (``"Linear weight, ghost form"``, ``"Conv1d depthwise weight, materialized"``,
            ``"LayerNorm bias"``, ...; several uses joined by ``" + "``), or
            ``"fallback to vmap: <why>"`` (:mod:`privasr.ghost.report` tabulates them).
    """

    names: list
    sq_norms: dict
    losses: torch.Tensor
    fallback: dict
    pieces: dict = field(repr=False, default_factory=dict)  # name -> list of _Seq / [K, numel]
    fallback_grads: dict = field(repr=False, default_factory=dict)  # name -> [K, *shape]
    graph: Optional[tuple] = field(repr=False, default=None)  # (losses, params) for route="backward"
    recorded: dict = field(repr=False, default_factory=dict)
    kinds: dict = field(repr=False, default_factory=dict)

    @property
    def norms(self) -> torch.Tensor:
        """``[K]`` float64: per-parameter squared norms combined in float64 (as core_norms does)."""
        return torch.stack([self.sq_norms[n] for n in self.names]).sum(0).sqrt()

    def weighted_sum(self, weights: torch.Tensor, keep: torch.Tensor, shapes: Sequence[torch.Size],
                     rows: Optional[Sequence[int]] = None) -> list[Optional[torch.Tensor]]:
        r"""Book-keeping: :math:`\sum_{i \in \text{keep}} w_i \nabla \ell_i` per parameter (None if unused).

        ``weights``: ``[K]``, the same for every parameter; or ``[G, K]`` with ``rows[p]`` the row
        parameter ``p`` is weighted by (per-layer clipping: one factor per (layer, unit)).

        The plain per-unit gradients (biases, LayerNorm) of the parameters sharing a row are summed
        as one product, ``w @ [K, sum of their sizes]``, not one product each.
        """
        if rows is None:
            weights, rows = weights.unsqueeze(0), [0] * len(self.names)
        if weights.dim() != 2 or len(rows) != len(self.names):
            raise ValueError(f"weights must be [K] or [G, K] with one row index per parameter ({len(self.names)}), "
                             f"got {tuple(weights.shape)} and {len(rows)} rows")
        keep = None if bool(keep.all()) else keep  # checked once, not per piece
        cast: dict = {}

        def w(row: int, dtype: torch.dtype) -> torch.Tensor:  # each row converted once per dtype
            key = (row, dtype)
            if key not in cast:
                cast[key] = weights[row].to(dtype)
            return cast[key]

        totals: list = [None] * len(self.names)
        plain: dict = {}  # (row, dtype) -> [(parameter index, per-unit gradients [K, numel])]
        for index, (name, row) in enumerate(zip(self.names, rows)):
            if name in self.fallback_grads:
                per_unit = _keep_rows(self.fallback_grads[name].reshape(weights.shape[1], -1), keep)
                totals[index] = w(row, per_unit.dtype) @ per_unit
            elif self.pieces.get(name):
                for piece in self.pieces[name]:
                    if isinstance(piece, _PIECES):
                        part = piece.weighted_sum(w(row, piece.dtype), keep)
                        totals[index] = part if totals[index] is None else totals[index] + part
                    else:
                        plain.setdefault((row, piece.dtype), []).append((index, piece))
            elif name in self.recorded:  # its recorded uses got no gradient
                totals[index] = torch.zeros_like(self.recorded[name])
        for (row, dtype), items in plain.items():
            stacked = _keep_rows(torch.cat([piece for _, piece in items], 1), keep)
            for (index, _), part in zip(items, (w(row, dtype) @ stacked).split([p.shape[1] for _, p in items])):
                totals[index] = part if totals[index] is None else totals[index] + part
        return [None if total is None else total.reshape(shape) for total, shape in zip(totals, shapes)]


def ghost_pass(model: torch.nn.Module, loss_fn: LossFn, tensors: Sequence[torch.Tensor],
               num_units: Optional[int] = None, keep_graph: bool = False, keep_pieces: bool = True) -> GhostPass:
    """Run ``loss_fn(*tensors)`` once under the recorder and take one backward (see the module doc).

    Each layer's norm is formed as the backward reaches it; only what the clipped sum needs is kept.

    Args:
        loss_fn: per-example losses ``[N]`` (summed here), or a scalar equal to the sum over units of
            each unit's loss (whose gradient is therefore the sum of the units' gradients).
        num_units: ``K`` (default ``N``: one unit per example); must divide ``N``.
        keep_graph: keep the autograd graph (for ``route="backward"``).
        keep_pieces: keep what :meth:`GhostPass.weighted_sum` needs; False: norms only (nothing of
            the pass is held once it returns).
    """
    named = trainable_parameters(model)
    if not named:
        raise ValueError("the model has no trainable parameter")
    batch = int(tensors[0].shape[0])
    num_units = batch if num_units is None else int(num_units)
    if num_units < 1 or batch % num_units:
        raise ValueError(f"num_units must divide the batch ({batch} examples), got {num_units}")
    for t in tensors:
        if t.shape[0] != batch:
            raise ValueError("every batch tensor must have the same first (batch) dimension")
    names = {id(p): n for n, p in named}
    anchor = torch.zeros((), requires_grad=True)  # every tap leads here: the backward stops at the earliest one
    recorder = _Recorder(names, batch, anchor)
    with recorder:
        losses = loss_fn(*tensors)
    recorder.check_versions()
    if not isinstance(losses, torch.Tensor) or losses.dim() > 1 or (losses.dim() == 1 and losses.shape[0] != batch):
        raise ValueError(f"loss_fn must return per-example losses [{batch}] or their sum (a scalar), got "
                         f"{getattr(losses, 'shape', type(losses))}")
    if losses.dim() == 1 and num_units != batch:
        raise ValueError("with num_units < N, loss_fn must return the sum of the units' losses (a scalar)")
    total = losses.sum()
    if not total.requires_grad:
        raise ValueError("loss_fn's result does not depend on any trainable parameter")
    fallback = dict(recorder.uncovered)
    for name in names.values():
        if name not in recorder.seen:
            fallback.setdefault(name, "not seen by any recorded operation")
    recorder.start_backward(set(fallback), num_units, keep_pieces)
    try:
        if recorder.uses:
            torch.autograd.grad(total, [anchor], allow_unused=True, retain_graph=keep_graph)
    finally:
        recorder.finish_backward()
    sq_norms = dict(recorder.sq_norms)
    fallback_grads = _fallback_grads(model, loss_fn, tensors, num_units, fallback) if fallback else {}
    for name, g in fallback_grads.items():
        sq_norms[name] = sq_norms_of(g)
    if not keep_pieces:
        fallback_grads = {}
    order = [n for n, _ in named]
    for name in order:
        if name not in sq_norms:  # (not setdefault: its default would be made for every name)
            sq_norms[name] = torch.zeros(num_units, dtype=torch.float64)
    graph = (losses, [p for _, p in named]) if keep_graph else None
    recorded = {n: p for n, p in named if n in recorder.uses and n not in fallback}
    kinds = {n: f"fallback to vmap: {fallback[n]}" if n in fallback
             else " + ".join(recorder.kinds.get(n, ["no recorded use"]))
             + (f", {recorder.forms[n]}" if n in recorder.forms else "") for n in order}
    return GhostPass(order, {n: sq_norms[n] for n in order}, losses.detach(), fallback, recorder.pieces,
                     fallback_grads, graph, recorded, kinds)



def _fallback_grads(model, loss_fn, tensors, num_units, fallback: dict) -> dict:
    """Exact per-unit gradients of the fallback parameters only, by vmap with the others frozen."""
    key = (type(model).__name__, tuple(sorted(fallback)))
    if key not in _noted:
        _noted.add(key)
        logger.warning("ghost norms: %d parameter(s) fall back to vmap per-example gradients: %s",
                       len(fallback), "; ".join(f"{n} ({why})" for n, why in sorted(fallback.items())))
    frozen = [p for n, p in trainable_parameters(model) if n not in fallback]
    for p in frozen:
        p.requires_grad_(False)
    try:
        grads, _ = shard_grads_vmap(model, lambda *shard: loss_fn(*shard).sum(), tensors, num_units)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    names = [n for n, _ in trainable_parameters(model) if n in fallback]
    return dict(zip(names, grads))

