r"""The front functions: per-example norms, the clipped sum, a CoreAccumulator's cores, summed shard losses.

The clipped sum :math:`\sum_i f_i \nabla \ell_i`, factors :math:`f_i` from
:func:`privasr.clipping.clip_factors` (``pcc``: :math:`\min(1, b / \lVert \nabla \ell_i \rVert)`),
is formed by book-keeping from the pieces a :func:`~privasr.ghost.passes.ghost_pass` kept (output
gradients scaled by :math:`f_i`: one backward in all), or, ``route="backward"``, by a second
backward of :math:`\sum_i f_i \ell_i` (memory of a plain step, the time of one more backward).
Non-finite units are dropped as :func:`~privasr.clipping.clip_factors` says: their rows are
replaced by zeros (``torch.where``, never ``0 * NaN``), or, on the second backward, a fresh
forward of the kept examples.

*Units*: with ``num_units=K`` the batch of ``N`` examples is ``K`` consecutive groups of ``N/K``
(the cores of :func:`privasr.per_sample.split_into_shards`) and every norm is of a group's gradient
(PCC with ``B > 1``). ``loss_fn`` must then return the sum over units of each unit's loss:
:func:`summed_shard_loss` turns a mean (or sum) shard loss into it with one forward of the batch.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from privasr.clipping import clip_factors
from privasr.ghost.passes import GhostPass, LossFn, ghost_pass
from privasr.per_sample import trainable_parameters

ROUTES = ("bookkeeping", "backward")


def per_example_norms(model: torch.nn.Module, loss_fn: LossFn, tensors: Sequence[torch.Tensor],
                      num_units: Optional[int] = None) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """``(norms [K] float64, per-parameter squared norms {name: [K]}, losses)`` (see :func:`ghost_pass`).

    Group the per-parameter squared norms by layer (e.g. ``model.param_groups()``) and sum them for
    per-layer clipping.
    """
    result = ghost_pass(model, loss_fn, tensors, num_units, keep_pieces=False)
    return result.norms, result.sq_norms, result.losses


def clipped_sum(model: torch.nn.Module, loss_fn: LossFn, tensors: Sequence[torch.Tensor], bound: float,
                method: str = "pcc", route: str = "bookkeeping", num_units: Optional[int] = None,
                ) -> tuple[list[Optional[torch.Tensor]], torch.Tensor, torch.Tensor]:
    r"""``(grads, norms, factors)``: :math:`\sum_i f_i \nabla\ell_i` per trainable parameter.

    ``factors`` come from :func:`privasr.clipping.clip_factors` (``method`` ``pcc`` for PEC/DP-SGD;
    non-finite units get 0 and are left out). ``route``: ``bookkeeping`` (from the recorded
    activations, one backward) or ``backward`` (a second backward of :math:`\sum_i f_i \ell_i`;
    needs per-example losses; dropped examples are left out by a fresh forward of the others).
    """
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; accepted: {', '.join(ROUTES)}")
    two_pass = route == "backward"
    result = ghost_pass(model, loss_fn, tensors, num_units, keep_graph=two_pass, keep_pieces=not two_pass)
    norms = result.norms
    factors, _ = clip_factors(norms, method, bound)
    return _clipped(result, model, loss_fn, tensors, factors, route), norms, factors


def _clipped(result: GhostPass, model, loss_fn, tensors, factors: torch.Tensor, route: str):
    params = [p for _, p in trainable_parameters(model)]
    keep = torch.isfinite(result.norms)
    if route == "bookkeeping":
        return result.weighted_sum(factors, keep, [p.shape for p in params])
    losses, graph_params = result.graph
    if losses.dim() != 1:
        raise ValueError('route="backward" needs loss_fn to return per-example losses [N]')
    if not bool(keep.all()):  # 0 * NaN would poison the sum: forward the kept examples again
        index = torch.nonzero(keep).flatten()
        if index.numel() == 0:
            return [torch.zeros_like(p) for p in params]
        losses = loss_fn(*[t[index.to(t.device)] for t in tensors])
        factors = factors[index]
    weighted = (losses * factors.to(losses.dtype).to(losses.device)).sum()
    grads = torch.autograd.grad(weighted, graph_params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def summed_shard_loss(shard_loss: LossFn, per_unit: int = 1, over_examples: str = "mean") -> LossFn:
    r"""A PrivateBrain shard loss -> the sum over the units (cores of ``per_unit`` examples) of their losses.

    privasr's shard losses are the mean (``loss_reduction: mean``, the toy) or the sum
    (``loss_reduction: sum``) over the shard's examples of a per-example term. For ``n`` examples
    in units of ``B = per_unit``, :math:`\sum_c L(\text{unit}_c)` is then ``(n / B) L(batch)`` (mean) or
    ``L(batch)`` (sum): one forward of the whole batch. A single unit gets its own loss, which is
    what the vmap fallback differentiates.
    """
    if over_examples not in ("mean", "sum"):
        raise ValueError(f"over_examples must be 'mean' or 'sum', got {over_examples!r}")
    if int(per_unit) < 1:
        raise ValueError(f"per_unit must be >= 1, got {per_unit}")

    def summed(*tensors):
        loss = shard_loss(*tensors)
        return loss * (tensors[0].shape[0] / int(per_unit)) if over_examples == "mean" else loss

    return summed


def accumulate(accumulator, model: torch.nn.Module, loss_fn: LossFn, tensors: Sequence[torch.Tensor],
               num_units: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Add this micro-batch's units (cores) to a :class:`privasr.distributed.CoreAccumulator` by ghost norms.

    Equal to ``accumulator.add_cores(per-unit vmap gradients)``: one recorded forward and backward
    give the units' norms, and :meth:`~privasr.distributed.CoreAccumulator.add_clipped_sum` takes
    them with the book-keeping weighted sum, for the factors the accumulator chooses (pcc's clip,
    apcc's 1/norm before :math:`b_t`, 1 for none/global; non-finite units dropped).
    Returns ``(norms, losses)``.
    """
    params = accumulator.params
    if [tuple(p.shape) for p in params] != [tuple(p.shape) for _, p in trainable_parameters(model)]:
        raise ValueError("the accumulator's parameters are not the model's trainable parameters in order; "
                         "build both from privasr.per_sample.trainable_parameters of the same module")
    result = ghost_pass(model, loss_fn, tensors, num_units)
    shapes = [p.shape for p in params]
    norms = accumulator.add_clipped_sum(result.norms, lambda factors, keep: result.weighted_sum(factors, keep, shapes))
    return norms, result.losses

