r"""Per-core clipping across processes: each process owns some cores, one all_reduce.

A process owns ``K`` virtual cores per micro-batch (``K = 1`` is plain DDP with one core
per process); with gradient accumulation the cores of every micro-batch of the step are
cores too, so a step has :math:`C = W \cdot K \cdot A` cores for ``W`` processes and
``A`` accumulation steps.

:class:`CoreAccumulator` adds each local core's gradient into ONE flat buffer as soon
as it is computed, already multiplied by its clip factor, so no per-core copy is kept:

* ``none``/``global``: factor 1;
* ``pcc``: :math:`\min(1, b/\lVert\bar g_c\rVert)`;
* ``apcc``: :math:`1/\lVert\bar g_c\rVert` now and :math:`b_t` later, since
  :math:`\sum_c \bar g_c\, b_t / \lVert\bar g_c\rVert = b_t \sum_c \bar g_c/\lVert\bar g_c\rVert`.

:meth:`CoreAccumulator.reduce` then runs one SUM all_reduce of
``[flat gradient | has-gradient flags | number of cores kept]`` and, for APCC only, one
scalar MIN all_reduce of the local smallest norm. Everything after that is local and
identical on every process. Non-finite cores are never added (dropped), and the mean
is over the cores kept. The result equals :func:`privasr.clipping.clip_and_aggregate`
on the same cores (tested to 1e-5 in fp32).

:func:`shutdown_process_group` (and :func:`ordered_shutdown` around a whole run) ends a
multi-process run in order: every rank meets at a barrier on the rendezvous store, then the
ranks destroy their groups in turn (highest first), while the interpreter is still fully
alive; a rank that failed destroys its group at once, without waiting.
"""
from __future__ import annotations

import contextlib
import logging
import math
from datetime import timedelta
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
# Before any process group exists, on purpose: torch.distributed.nn.functional binds ``group=group.WORLD`` as
# default arguments when first imported, and torch.optim imports it lazily (through torch._dynamo) at the first
# optimizer, after init_process_group; those defaults would then hold the default group for the life of the
# process, so destroy_process_group could not free it, and its gloo threads and the store's server thread would
# run on into the interpreter's exit (see shutdown_process_group).
import torch.distributed.nn  # noqa: F401

from privasr.clipping import AggregationStats, check_method, clip_factors, core_norm, core_norms, global_clip_factor

logger = logging.getLogger(__name__)

#: ``allreduce_dtype`` names (YAML) -> dtypes of :class:`CoreAccumulator`'s cross-process sum.
ALLREDUCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

#: How long a rank that finished waits at the shutdown barrier for the others (rank 0 may still
#: be decoding): torch's default process-group timeout.
SHUTDOWN_TIMEOUT = timedelta(minutes=30)


def world_info() -> tuple[int, int]:
    """``(rank, world_size)``, ``(0, 1)`` when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Make every process start from ``src``'s parameters and buffers (what DDP does at wrap time)."""
    if world_info()[1] == 1:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=src)


class CoreAccumulator:
    """Clip-and-accumulate the cores of this process, then reduce across processes.

    Args:
        params: the trainable parameters, in a fixed order shared by all processes.
        method: ``none``, ``global``, ``pcc`` or ``apcc``.
        bound: ``b`` for pcc, the max norm for global.
        reduction: ``mean`` or ``sum``.
        allreduce_dtype: dtype of the cross-process sum of the clipped gradients. float32 (the
            default) is exact to fp32 rounding and is what the equivalence tests check; bfloat16
            halves the bytes sent (for GPUs with slow links) but rounds each process's partial sum to
            8 significant bits (relative error up to 2^-8 of each contribution). Flags and the
            number of cores kept are always summed in float32.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], method: str, bound: Optional[float] = None,
                 reduction: str = "mean", allreduce_dtype: torch.dtype = torch.float32):
        check_method(method, bound, reduction)
        if allreduce_dtype not in ALLREDUCE_DTYPES.values():
            raise ValueError(f"allreduce_dtype must be one of {', '.join(ALLREDUCE_DTYPES)}, got {allreduce_dtype}")
        self.allreduce_dtype = allreduce_dtype
        self.params = list(params)
        self.method, self.bound, self.reduction = method, bound, reduction
        self.numels = [p.numel() for p in self.params]
        self.total_numel = sum(self.numels)
        self._device = self.params[0].device if self.params else torch.device("cpu")
        self._buffer: Optional[torch.Tensor] = None
        self._views: list[torch.Tensor] = []
        self.norms: list[torch.Tensor] = []
        self.local_min_norm = math.inf

    @property
    def buffer(self) -> torch.Tensor:
        """``[flat gradient | one has-grad flag per parameter | cores kept]``, float32. Made at the first use
        (an add, after the cores' backward), so it is not alive during the step's memory peak."""
        if self._buffer is None:
            self._buffer = torch.zeros(self.total_numel + len(self.params) + 1, dtype=torch.float32,
                                       device=self._device)
            self._views = list(self.flat.split(self.numels))  # each parameter's part, flat
        return self._buffer

    @property
    def flat(self) -> torch.Tensor:
        return self.buffer[: self.total_numel]

    @property
    def has_grad(self) -> torch.Tensor:
        return self.buffer[self.total_numel: self.total_numel + len(self.params)]

    def _local_factors(self, norms: torch.Tensor) -> torch.Tensor:
        if self.method == "apcc":  # b_t is only known after the MIN all_reduce
            positive = torch.isfinite(norms) & (norms > 0)
            safe = torch.where(positive, norms, torch.ones_like(norms))
            if positive.any():
                self.local_min_norm = min(self.local_min_norm, float(norms[positive].min()))
            return torch.where(positive, 1.0 / safe, torch.zeros_like(norms))
        return clip_factors(norms, self.method, self.bound)[0]

    def add_cores(self, stacked_grads: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        """Add ``K`` cores at once; ``stacked_grads[p]`` has shape ``[K, *param.shape]`` or is None.

        Returns the ``K`` per-core norms (float64).
        """
        present = [g for g in stacked_grads if g is not None]
        if not present:
            raise ValueError("add_cores got no gradient for any parameter")
        num_cores = present[0].shape[0]
        norms = core_norms(stacked_grads)
        finite = torch.isfinite(norms)
        factors = self._local_factors(norms).to(torch.float32)
        # Decided once per call, not per parameter (each check is a host sync on a GPU):
        # torch.where, not a product, drops a non-finite core: 0 * NaN would poison the sum.
        keep = None if bool(finite.all()) else finite.to(self._device).unsqueeze(1)
        factor = float(factors[0]) if num_cores == 1 else None
        factors = factors.to(self._device)
        parts, used = self._parts(), []
        for index, (g, numel) in enumerate(zip(stacked_grads, self.numels)):
            if g is None:
                continue
            g = g.detach().reshape(num_cores, numel).to(torch.float32)
            if keep is not None:
                g = torch.where(keep, g, torch.zeros((), dtype=g.dtype, device=g.device))
            if num_cores == 1:  # in place, no temporary the size of the gradient
                parts[index].add_(g[0], alpha=factor)
            else:
                parts[index].addmv_(g.t(), factors)
            used.append(index)
        self._mark(used)
        self._count_cores(norms)
        return norms

    def _parts(self) -> list[torch.Tensor]:
        """Each parameter's part of :attr:`flat` as a flat view (made with the buffer, at the first use)."""
        if self._buffer is None:
            _ = self.buffer
        return self._views

    def _mark(self, used: list) -> None:
        """Set the has-gradient flags of the parameters ``used`` (one op, not one per parameter)."""
        if used:
            self.has_grad[torch.tensor(used, device=self._device)] = 1.0

    def add_clipped_sum(self, norms: torch.Tensor, clipped_sum: Callable[[torch.Tensor, torch.Tensor], Sequence]
                        ) -> torch.Tensor:
        r"""Add ``K`` cores known by their norms and a function that forms their weighted sum.

        For a caller that has each core's norm :math:`\lVert\bar g_k\rVert` without the
        gradients :math:`\bar g_k` themselves (ghost norms, :func:`privasr.ghost.accumulate`).
        The accumulator chooses the factors :math:`f_k`, exactly as :meth:`add_cores` does (pcc:
        :math:`\min(1, b/\lVert\bar g_k\rVert)`; apcc: :math:`1/\lVert\bar g_k\rVert` now,
        :math:`b_t` after the MIN all_reduce; none/global: 1; a non-finite norm: 0, and the core is
        dropped), and calls ``clipped_sum(factors, keep)``, which must return
        :math:`\sum_{k:\,\text{keep}_k} f_k \bar g_k` per parameter (a tensor of the parameter's
        shape, or None where no core has a gradient), in :attr:`params` order. ``factors`` is
        ``[K]`` float64 (0 where ``keep`` is False); the function must leave the dropped cores out
        (``torch.where``, never ``0 * NaN``).

        Equal to :meth:`add_cores` on the same cores (``tests/test_ddp_equivalence.py``).
        Returns ``norms`` (float64).
        """
        norms = torch.as_tensor(norms).detach().to(torch.float64).reshape(-1)
        factors = self._local_factors(norms).to(torch.float64)
        grads = list(clipped_sum(factors, torch.isfinite(norms)))
        if len(grads) != len(self.params):
            raise ValueError(f"clipped_sum returned {len(grads)} gradients for the accumulator's {len(self.params)} "
                             f"parameters: return one per parameter, in order (None for an unused one)")
        used = [index for index, g in enumerate(grads) if g is not None]
        for index in used:
            if grads[index].numel() != self.numels[index]:
                raise ValueError(f"clipped_sum's gradient {index} has {grads[index].numel()} elements, its parameter "
                                 f"{tuple(self.params[index].shape)} has {self.numels[index]}")
        if used:  # one call for every parameter (the per-parameter adds cost a dispatch each)
            parts = self._parts()
            torch._foreach_add_([parts[i] for i in used],
                                [grads[i].detach().reshape(-1).to(torch.float32) for i in used])
        self._mark(used)
        self._count_cores(norms)
        return norms

    def _count_cores(self, norms: torch.Tensor) -> None:
        """Book-keeping of added cores: the number kept (finite) and their norms for the stats."""
        self.buffer[-1] += float(torch.isfinite(norms).sum())
        self.norms.append(norms.cpu())

    def add_core(self, grads: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        """Add one core's gradient (one entry per parameter, or None); returns its norm."""
        return self.add_cores([None if g is None else g.unsqueeze(0) for g in grads])[0]

    def reduce(self, group=None) -> tuple[list[Optional[torch.Tensor]], AggregationStats]:
        """All-reduce across processes and return the final per-parameter gradient.

        Must be called on every process of ``group``, once per optimizer step.
        """
        _, world_size = world_info()
        if world_size > 1 and self.allreduce_dtype == torch.float32:
            dist.all_reduce(self.buffer, op=dist.ReduceOp.SUM, group=group)
        elif world_size > 1:  # the gradient in the narrower dtype, the flags and the core count exact in fp32
            narrow = self.flat.to(self.allreduce_dtype)
            dist.all_reduce(narrow, op=dist.ReduceOp.SUM, group=group)
            tail = self.buffer[self.total_numel:]
            dist.all_reduce(tail, op=dist.ReduceOp.SUM, group=group)
            self.flat.copy_(narrow)
        bound_in_force = self.bound if self.method in ("pcc", "global") else None
        if self.method == "apcc":
            b_t = torch.tensor([self.local_min_norm], dtype=torch.float64, device=self.buffer.device)
            if world_size > 1:
                dist.all_reduce(b_t, op=dist.ReduceOp.MIN, group=group)
            bound_in_force = float(b_t) if math.isfinite(float(b_t)) else None
            self.flat.mul_(bound_in_force or 0.0)
        kept = float(self.buffer[-1])
        if self.reduction == "mean" and kept > 0:
            self.flat.div_(kept)
        global_factor = 1.0
        if self.method == "global" and kept > 0:
            global_factor = global_clip_factor(float(core_norm([self.flat])), float(self.bound))
            self.flat.mul_(global_factor)
        grads = self._unflatten()
        local_norms = torch.cat(self.norms) if self.norms else torch.zeros(0, dtype=torch.float64)
        factors = self._final_factors(local_norms, bound_in_force)
        dropped = [int(i) for i in torch.nonzero(~torch.isfinite(local_norms)).flatten()]
        stats = AggregationStats(local_norms, factors, bound_in_force, dropped, skipped=kept == 0,
                                 global_factor=global_factor)
        return grads, stats

    def _final_factors(self, norms: torch.Tensor, bound_in_force: Optional[float]) -> torch.Tensor:
        if self.method == "apcc":
            if bound_in_force is None:
                return torch.zeros_like(norms)
            positive = torch.isfinite(norms) & (norms > 0)
            return torch.where(positive, bound_in_force / torch.where(positive, norms, 1.0), 0.0)
        return clip_factors(norms, self.method, self.bound)[0]

    def _unflatten(self) -> list[Optional[torch.Tensor]]:
        flags = self.has_grad.tolist()  # one read, not one per parameter
        # views of the step's buffer (a fresh accumulator each step), copied only to change dtype
        return [view.view_as(param).to(param.dtype) if flag > 0 else None
                for view, param, flag in zip(self._parts(), self.params, flags)]


def gather_norms(local_norms: torch.Tensor, group=None) -> torch.Tensor:
    """All per-core norms of the step from every process (for logging only, not in the hot path)."""
    _, world_size = world_info()
    if world_size == 1:
        return local_norms
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, local_norms.cpu(), group=group)
    return torch.cat(gathered)


# -- shutdown ------------------------------------------------------------------------------------
_SHUTDOWN_KEY = "privasr/shutdown"
_shutdowns = 0  # groups this process has shut down: a group made again on the same store gets fresh keys


def _arrive(store, key: str, world_size: int, timeout: timedelta) -> None:
    """Barrier on the rendezvous store: the last rank to add itself sets ``arrived``, all wait for it.

    The store, not a collective, so that (a) the timeout is real: a gloo barrier that times out stays
    in flight in the backend's worker thread, and ``destroy_process_group`` then joins that thread
    for the group's whole timeout; (b) it never mixes with a collective a stuck peer has in flight.
    """
    if store.add(f"{key}/arrive", 1) == world_size:
        store.set(f"{key}/arrived", "1")
    store.wait([f"{key}/arrived"], timeout)


def shutdown_process_group(failed: bool = False, timeout: Optional[timedelta] = None) -> bool:
    """End this process's part of the default process group in order; idempotent.

    Without a group (one process, or already shut down) it does nothing and returns False.
    Otherwise:

    * ``failed=False`` (this rank finished its work): every rank first meets at a barrier, so that
      no rank closes its connections while a peer still has a collective in flight or is still
      working alone (rank 0 decoding); then the ranks destroy their groups one after the other,
      highest rank first, each once the next higher rank has finished destroying its own, so no
      rank is tearing its group down while a peer closes connections to it, and rank 0 (where the
      store's server may live: ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, ``mp.spawn``) goes last.
      Each wait lasts at most ``timeout`` (:data:`SHUTDOWN_TIMEOUT`); then a warning, and the group
      is destroyed anyway.
    * ``failed=True`` (an exception is ending this rank): no waiting, since the peers may never get
      there; the group is destroyed at once, so a peer blocked in a collective with this rank fails
      fast ("connection closed") instead of hanging for the group's timeout, and the launcher
      (torchrun, ``mp.spawn``) ends the others.

    Either way ``destroy_process_group()`` runs now, while the interpreter is alive: a group left
    to the interpreter's exit is torn down during finalization, where the backend's threads cannot
    be joined cleanly (``terminate called without an active exception``, SIGABRT). That frees the group only
    if nothing else holds it: this module imports ``torch.distributed.nn`` first for that reason. Never raises
    (it runs on error paths, where it must not hide the original error); returns True when it
    destroyed a group.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return False
    global _shutdowns
    rank, world_size = world_info()
    store, key = None, f"{_SHUTDOWN_KEY}/{_shutdowns}"
    _shutdowns += 1
    if not failed and world_size > 1:
        timeout = timeout or SHUTDOWN_TIMEOUT
        try:
            store = dist.distributed_c10d._get_default_store()  # kept: it outlives the group for the last step
            _arrive(store, key, world_size, timeout)
            if rank < world_size - 1:
                store.wait([f"{key}/destroyed/{rank + 1}"], timeout)
        except Exception as err:  # a peer died or is stuck: close anyway, the launcher reports it
            text = str(err).strip()
            logger.warning("rank %d: the other processes did not reach the end of the run (%s); closing anyway",
                           rank, text.splitlines()[0] if text else type(err).__name__)
    try:
        dist.destroy_process_group()
    except Exception as err:  # pragma: no cover - nothing left to do about it but say so
        logger.warning("rank %d: destroy_process_group failed: %s", rank, err)
    if store is not None and rank > 0:
        with contextlib.suppress(Exception):  # the store is gone: nobody is left waiting for this rank
            store.set(f"{key}/destroyed/{rank}", "1")
    return True


@contextlib.contextmanager
def ordered_shutdown(timeout: Optional[timedelta] = None) -> Iterator[None]:
    """Run the block, then :func:`shutdown_process_group`, ``failed`` when the block raised.

    ``SystemExit`` with status 0 (``sys.exit()``, ``--help``) counts as success; any other
    exception, ``KeyboardInterrupt`` included, as a failure. The exception propagates.
    """
    try:
        yield
    except SystemExit as err:
        shutdown_process_group(failed=err.code not in (None, 0), timeout=timeout)
        raise
    except BaseException:
        shutdown_process_group(failed=True, timeout=timeout)
        raise
    shutdown_process_group(timeout=timeout)
