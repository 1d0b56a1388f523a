r"""Per-core clipping in any PyTorch training loop: :class:`PerCoreClipping`.

The step is Algorithm 1 of the per-core clipping paper (Wang et al.), with its baselines.
A step has :math:`C = W \cdot K \cdot A` cores: ``W`` processes (``torch.distributed``),
``K`` virtual cores per process and ``A`` micro-batches (gradient accumulation, one
:meth:`PerCoreClipping.backward` call each). Core :math:`c` computes the mean gradient
:math:`\bar g_c = \nabla_\theta L(\theta; \text{shard}_c)` of its shard, and

* ``none``:   :math:`\hat g_c = \bar g_c` (what DDP does);
* ``global``: ``none``, then the aggregate :math:`g \leftarrow g \min(1, b/\lVert g\rVert)`;
* ``pcc``:    :math:`\hat g_c = \bar g_c \min(1, b/\lVert\bar g_c\rVert)`;
* ``apcc``:   :math:`\hat g_c = \bar g_c\, b_t/\lVert\bar g_c\rVert`,
  :math:`b_t = \min_c \lVert\bar g_c\rVert` over the finite, non-zero norms of all :math:`C` cores;
* ``pec``:    ``pcc`` with one example per core (per-example clipping, DP-SGD without noise);

the update is :math:`g = \frac1C \sum_c \hat g_c` (``reduction="mean"``) or :math:`\sum_c \hat g_c`
(``"sum"``, the paper's Algorithm 1). A core whose gradient holds a NaN/Inf is dropped (the mean
is over the cores kept); if no core is left, the step is *skipped* (``stats.skipped``).

Usage (the model is NOT wrapped in DistributedDataParallel: DDP would all-reduce the
*unclipped* gradients during ``backward``)::

    clip = PerCoreClipping(model, method="pcc", bound=1.0, virtual_cores=4)  # broadcasts rank 0's weights
    for x, y in loader:                              # this process's batch
        loss = clip.backward(loss_fn, x, y)          # loss_fn(*shard) -> scalar mean loss of a shard
        stats = clip.reduce()                        # one all_reduce; writes p.grad
        if not stats.skipped:
            optimizer.step()

Where the maths lives (one source each): the norm and the factors in :mod:`privasr.clipping`,
clip-into-one-buffer and the all-reduce in :class:`privasr.distributed.CoreAccumulator`, the
per-shard gradients in :mod:`privasr.per_sample`; this module only composes them, and holds the
one loop/vmap dispatch (:func:`accumulate_cores`).
"""
from __future__ import annotations

import logging
import numbers
from typing import Callable, Optional, Sequence

import torch

from privasr.clipping import METHODS, AggregationStats, check_method
from privasr.distributed import ALLREDUCE_DTYPES, CoreAccumulator, broadcast_parameters
from privasr.ghost import accumulate as ghost_accumulate
from privasr.ghost import summed_shard_loss
from privasr.per_sample import ShardLoss, shard_grads_loop, shard_grads_vmap, trainable_parameters

__all__ = ["PerCoreClipping", "accumulate_cores", "broadcast_parameters", "STRATEGIES", "CORE_GRAD_MODES",
           "LOSS_REDUCTIONS"]

logger = logging.getLogger(__name__)

#: ``method`` names: the aggregation methods of :mod:`privasr.clipping` plus ``pec``.
STRATEGIES = METHODS + ("pec",)
#: How per-core gradients are computed: by :mod:`privasr.per_sample` (``loop``, ``vmap``), or
#: not at all (``ghost``: the cores' norms and clipped sum from one forward and backward of the
#: batch, :mod:`privasr.ghost`).
CORE_GRAD_MODES = ("loop", "vmap", "ghost")
#: How a shard loss reduces over its examples (what ``ghost`` needs to know, see :func:`accumulate_cores`).
LOSS_REDUCTIONS = ("mean", "sum")


def accumulate_cores(accumulator: CoreAccumulator, model: torch.nn.Module, loss_fn: ShardLoss,
                     tensors: Sequence[torch.Tensor], num_shards: int, mode: str = "loop",
                     trim: Optional[Callable[..., tuple]] = None, loss_reduction: Optional[str] = "mean"
                     ) -> torch.Tensor:
    r"""Split ``tensors`` into ``num_shards`` cores, clip each core's gradient into ``accumulator``.

    The one loop/vmap/ghost dispatch. When the batch divides evenly into ``num_shards``:

    * ``"vmap"`` computes every core's gradient in one vectorised pass
      (:func:`privasr.per_sample.shard_grads_vmap`; ``trim`` is not used);
    * ``"ghost"`` forms no per-core gradient: one forward of the whole batch and one backward give
      every core's norm and the clipped sum (:func:`privasr.ghost.accumulate`, into
      :meth:`CoreAccumulator.add_clipped_sum`; ``trim`` is not used: padding is inert). A core's
      norm is exact for any number ``B`` of examples per core (``pec``: ``B = 1``; ``pcc``/``apcc``:
      a core's layer gradient is the sum over its examples' positions, see :mod:`privasr.ghost`).
      The batch's loss must be the sum of the cores' losses, so ghost needs ``loss_reduction``:
      how ``loss_fn`` reduces over a shard's examples, ``"mean"`` or ``"sum"`` of a per-example
      term (:math:`\sum_c L(\text{core}_c) = (n/B)\,L(\text{batch})` or :math:`L(\text{batch})`,
      :func:`privasr.ghost.summed_shard_loss`); ``None`` (the loss is neither, e.g. a mean over
      frames pooled across examples) is refused. Every example's rows must be its own: no
      batch statistics (BatchNorm) in the model.

    Otherwise (``"loop"``, or unequal shards) one backward per core
    (:func:`privasr.per_sample.shard_grads_loop`), each core added before the next is computed,
    so one gradient copy is alive at a time. Returns the mean over the cores of their losses
    (detached).
    """
    if mode not in CORE_GRAD_MODES:
        raise ValueError(f"unknown core_grad_mode {mode!r}; accepted: {', '.join(CORE_GRAD_MODES)}")
    if mode == "ghost" and loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"core_grad_mode 'ghost' computes every core in one forward of the batch, so it needs the "
                         f"shard loss to be the mean or the sum over the shard's examples of a per-example loss "
                         f"(loss_reduction {' or '.join(map(repr, LOSS_REDUCTIONS))}), got {loss_reduction!r}; "
                         f"use core_grad_mode loop or vmap")
    divisible = tensors[0].shape[0] % num_shards == 0
    if mode == "ghost" and divisible:
        summed = summed_shard_loss(loss_fn, tensors[0].shape[0] // num_shards, loss_reduction)
        _, total = ghost_accumulate(accumulator, model, summed, tensors, num_shards)
        return total / num_shards  # the sum over the cores of their losses -> their mean
    if mode == "vmap" and divisible:
        grads, losses = shard_grads_vmap(model, loss_fn, tensors, num_shards)
        accumulator.add_cores(grads)
        return losses.mean()
    losses = []
    for grads, loss in shard_grads_loop(model, loss_fn, tensors, num_shards, trim):
        accumulator.add_core(grads)
        losses.append(loss)
    return torch.stack(losses).mean()


def unequal_cores_message(batch_size: int, num_shards: int) -> Optional[str]:
    """The warning for a batch that does not split into equal cores, or None when it does."""
    if batch_size % num_shards == 0:
        return None
    return (f"a batch of {batch_size} examples split into {num_shards} cores of unequal size (per-core batch "
            f"{batch_size // num_shards} or {batch_size // num_shards + 1}); use a batch_size divisible by "
            f"virtual_cores for equal cores")


def _scalar_loss(loss_fn: ShardLoss) -> ShardLoss:
    """``loss_fn`` that refuses a non-scalar loss with an error naming the fix."""
    def checked(*shard):
        loss = loss_fn(*shard)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return the scalar mean loss of its shard, got {shape}; "
                             "reduce it with .mean() over the shard's examples")
        return loss
    return checked


class PerCoreClipping:
    r"""Clip per core, accumulate, and reduce across processes once per optimizer step.

    Args:
        model: the ``torch.nn.Module`` being trained (its parameters with ``requires_grad``, in
            module order, get the update). Not wrapped in ``DistributedDataParallel``.
        method: ``pcc``, ``apcc``, ``pec``, ``none`` or ``global`` (see the module docstring).
        bound: the clipping bound :math:`b` (pcc, pec) or the maximum norm of the aggregate
            (global); unused by apcc (:math:`b_t` is adaptive) and none.
        virtual_cores: :math:`K`, the cores each process emulates per :meth:`backward` call (its
            batch is split into ``K`` contiguous shards). ``pec`` uses one core per example instead.
        reduction: ``mean`` (divide by the cores kept) or ``sum`` (Algorithm 1).
        core_grad_mode: ``loop`` (one backward per core, one gradient copy in memory), ``vmap``
            (all cores of a call in one vectorised pass; ``loss_fn`` must then be ``torch.func``
            compatible: no ``.item()``, no in-place update of parameters or buffers) or ``ghost``
            (no per-core gradient at all: norms and the clipped sum from one forward and backward
            of the batch, see :func:`accumulate_cores`); a batch that does not divide into ``K``
            falls back to the loop.
        loss_reduction: how ``loss_fn`` reduces over a shard's examples, ``mean`` or ``sum`` of a
            per-example loss (``ghost`` only; see :func:`accumulate_cores`).
        allreduce_dtype: ``"float32"`` (exact) or ``"bfloat16"`` (half the bytes, 8 significant bits)
            for the cross-process sum of the clipped gradients, see :class:`CoreAccumulator`.
        broadcast: copy rank 0's parameters and buffers to every process now (what DDP does when it
            wraps a model; a collective, so construct on every process). Harmless with one process.

    After :meth:`reduce`, ``p.grad`` of every trained parameter holds the update :math:`g`
    (identical on every process) or None for a parameter no core gave a gradient. When
    ``stats.skipped`` (every core of the step NaN/Inf), every ``p.grad`` is None and the caller
    must not call ``optimizer.step()``: torch's optimizers pass over a parameter whose grad is
    None, but a learning-rate scheduler, a step counter or another optimizer would count the
    step. ``p.grad`` is written only by :meth:`reduce`; :meth:`backward` leaves it alone.
    """

    def __init__(self, model: torch.nn.Module, method: str, bound: Optional[float] = None, virtual_cores: int = 1,
                 reduction: str = "mean", core_grad_mode: str = "loop", allreduce_dtype="float32",
                 broadcast: bool = True, loss_reduction: str = "mean"):
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            raise ValueError("PerCoreClipping needs the bare model, not a DistributedDataParallel/DataParallel wrapper:"
                             " DDP all-reduces the unclipped gradients during backward; pass model.module and let "
                             "PerCoreClipping reduce the clipped ones")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"PerCoreClipping needs the torch.nn.Module being trained (per-core gradients are taken "
                            f"through it with torch.func), got {type(model).__name__}")
        if method not in STRATEGIES:
            raise ValueError(f"unknown clipping method {method!r}; accepted: {', '.join(STRATEGIES)}")
        self.aggregation = "pcc" if method == "pec" else method  # pec clips like pcc, one example per core
        check_method(self.aggregation, bound, reduction)
        if isinstance(virtual_cores, bool) or not isinstance(virtual_cores, numbers.Integral) or virtual_cores < 1:
            raise ValueError(f"virtual_cores must be an integer >= 1 (cores each process emulates), "
                             f"got {virtual_cores!r}")
        if core_grad_mode not in CORE_GRAD_MODES:
            raise ValueError(f"unknown core_grad_mode {core_grad_mode!r}; accepted: {', '.join(CORE_GRAD_MODES)}")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"unknown loss_reduction {loss_reduction!r} (how loss_fn reduces over a shard's "
                             f"examples); accepted: {', '.join(LOSS_REDUCTIONS)}")
        allreduce_dtype = ALLREDUCE_DTYPES.get(allreduce_dtype, allreduce_dtype)  # a name or a torch.dtype
        if allreduce_dtype not in ALLREDUCE_DTYPES.values():
            raise ValueError(f"unknown allreduce_dtype {allreduce_dtype!r}; accepted: {', '.join(ALLREDUCE_DTYPES)}")
        self.model, self.method, self.bound = model, method, bound
        virtual_cores = int(virtual_cores)
        self.virtual_cores, self.reduction, self.core_grad_mode = virtual_cores, reduction, core_grad_mode
        self.allreduce_dtype, self.loss_reduction = allreduce_dtype, loss_reduction
        self.params = [p for _, p in trainable_parameters(model)]
        if not self.params:
            raise ValueError("the model has no parameter with requires_grad=True: nothing to train")
        self._accumulator: Optional[CoreAccumulator] = None
        self._warned_unequal = False
        if broadcast:
            broadcast_parameters(model)

    def num_cores(self, batch_size: int) -> int:
        """Cores this process emulates for a batch of ``batch_size`` examples."""
        return batch_size if self.method == "pec" else self.virtual_cores

    @property
    def accumulating(self) -> bool:
        """True between the first :meth:`backward` of a step and its :meth:`reduce`."""
        return self._accumulator is not None

    def backward(self, loss_fn: ShardLoss, *tensors: torch.Tensor,
                 trim: Optional[Callable[..., tuple]] = None) -> torch.Tensor:
        """Per-core gradients of this micro-batch, clipped into the step's accumulator.

        ``tensors`` are this process's batch, every one with the examples along dim 0; they are
        split into :meth:`num_cores` contiguous shards and ``loss_fn(*shard)`` must return the
        scalar mean loss of a shard. Call again before :meth:`reduce` for gradient accumulation:
        each call's cores are more cores of the same step. ``trim(*shard) -> shard`` (loop mode)
        may cut a shard's padding (:meth:`privasr.asr.ASRBrain.trim_shard`).

        Returns the mean of the cores' losses (detached).
        """
        if not tensors:
            raise ValueError("backward(loss_fn, *tensors) got no batch tensors: pass the batch, e.g. "
                             "clip.backward(loss_fn, x, y)")
        if not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in tensors):
            raise ValueError("every batch argument of backward() must be a tensor with the examples along dim 0")
        batch = tensors[0].shape[0]
        if any(t.shape[0] != batch for t in tensors):
            raise ValueError(f"every batch tensor must hold the same number of examples along dim 0, got "
                             f"{[t.shape[0] for t in tensors]}")
        cores = self.num_cores(batch)
        if batch < cores:
            raise ValueError(f"a batch of {batch} examples cannot feed virtual_cores={cores} cores (each core needs "
                             f"at least one example): give each process a batch of >= {cores} examples or lower "
                             f"virtual_cores")
        message = unequal_cores_message(batch, cores)
        if message and not self._warned_unequal:
            self._warned_unequal = True  # e.g. the last batch of an epoch without drop_last
            logger.warning(message)
        if self._accumulator is None:
            self._accumulator = CoreAccumulator(self.params, self.aggregation, self.bound, self.reduction,
                                                self.allreduce_dtype)
        return accumulate_cores(self._accumulator, self.model, _scalar_loss(loss_fn), tensors, cores,
                                self.core_grad_mode, trim, self.loss_reduction)

    def reduce(self, group=None) -> AggregationStats:
        """End the step: one all_reduce across processes, then ``p.grad`` = the update.

        A collective when ``torch.distributed`` is initialised: every process of ``group`` calls
        it once per optimizer step, after the same number of :meth:`backward` calls. Returns
        :class:`privasr.clipping.AggregationStats` of THIS process's cores (norms, factors, the
        bound in force, dropped cores as local indices; ``skipped`` and ``bound`` are the same on
        every process). :func:`privasr.distributed.gather_norms` collects every process's norms.
        """
        if self._accumulator is None:
            raise RuntimeError("reduce() called without backward(): call clip.backward(loss_fn, *batch) for "
                               "this step first (every process, the same number of times)")
        accumulator, self._accumulator = self._accumulator, None
        grads, stats = accumulator.reduce(group)
        for param, g in zip(self.params, grads):
            param.grad = None if stats.skipped else g
        if stats.skipped:  # the same on every process: no core of any process was finite
            logger.warning("every core of the step had a NaN/Inf gradient: no update (do not call optimizer.step())")
        return stats
