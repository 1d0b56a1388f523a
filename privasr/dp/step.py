r"""The DP-SGD step for any training loop: :class:`DPSGDStep` (clip per example, noise once, ledger).

One step :math:`t` over this process's share :math:`B_t^r` of a Poisson batch (Abadi et al.
2016, with the per-layer clipping of the DP encoder paper)::

    s_r = Σ_{i ∈ B_t^r} clip(∇_θ ℓ(θ; x_i))          backward(): loop | vmap | ghost, any number of calls
    g̃_t = AllReduce_Σ(s_r + 1[r = 0] z) / (qN),     reduce(): z ~ 𝒩(0, σ²C² I), one SUM all-reduce
    ledger += (σ, q)                                  the release is counted when it is made

``clip`` is a :class:`~privasr.dp.per_layer.PerLayerClipper` (flat: :math:`\|\bar g_i\| \le C`;
per-layer: :math:`\|\bar g_{i,k}\| \le C_k`, :math:`\sum_k C_k^2 = C^2`, so the sensitivity is
:math:`C` either way). The noise is drawn on rank 0 only, so it is added once whatever the number
of processes (:func:`privasr.dp.noise.privatize`), and the divisor is the *expected* batch
:math:`qN`, never the realised one. A step with no example on any rank (``reduce`` without
``backward``) still adds the noise and still counts.

Usage (the model is NOT wrapped in DistributedDataParallel: DDP would all-reduce unclipped gradients)::

    clipper = PerLayerClipper(model.named_parameters(), max_norm=1.0, mode="dim")
    dp = DPSGDStep(model, clipper, noise_multiplier=1.1, expected_batch_size=q * N,
                   noise=NoiseSource(None), ledger=PrivacyLedger(1e-5), sample_rate=q)
    for batch in poisson_loader:                        # this rank's share of B_t (may be empty)
        if len(batch):
            dp.backward(loss_fn, *batch)                # loss_fn(*one_example) -> scalar
        stats = dp.reduce()                             # writes p.grad = g̃_t; ledger.step(σ, q)
        optimizer.step()

:class:`privasr.dp.brain.DPSGDBrain` and ``privasr-bench-dp`` both take their step from here.
The per-example gradients and the clipped sum are :func:`clipped_example_sum` (the one
loop / vmap / ghost dispatch of per-example clipping; :func:`privasr.private_step.accumulate_cores`
is its per-core sibling, whose factor is one scalar per core).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from privasr.dp.noise import NoiseSource, privatize
from privasr.dp.per_layer import ClipResult, PerLayerClipper
from privasr.ghost import ghost_pass
from privasr.per_sample import shard_grads_loop, shard_grads_vmap, trainable_parameters
from privasr.private_step import CORE_GRAD_MODES

__all__ = ["DPSGDStep", "DPStepStats", "clipped_example_sum", "ghost_clipped_sum"]


def _add(total: Optional[List[torch.Tensor]], part: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    return list(part) if total is None else [a + b for a, b in zip(total, part)]


def _dense(grads: Sequence[Optional[torch.Tensor]], params: Sequence[torch.nn.Parameter]) -> List[torch.Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def clipped_example_sum(module: torch.nn.Module, loss_fn, tensors: Sequence[torch.Tensor], clipper: PerLayerClipper,
                        grad_mode: str = "loop", micro_batch: int = 8, ghost_loss_fn=None):
    r""":math:`\sum_i \mathrm{clip}(\nabla_\theta \ell(\theta; x_i))` over the examples of ``tensors`` (dim 0).

    Args:
        module: owns the trained parameters (those with ``requires_grad``, in the clipper's order).
        loss_fn: ``loss_fn(*example_tensors) -> scalar`` for a batch of one example.
        clipper: a :class:`~privasr.dp.per_layer.PerLayerClipper` built on ``module``'s trained parameters.
        grad_mode: ``loop`` (one backward per example, memory of one gradient), ``vmap``
            (``micro_batch`` examples per vectorised call) or ``ghost`` (``micro_batch`` examples per
            recorded forward + backward, no per-example gradient: :func:`ghost_clipped_sum`).
        ghost_loss_fn: for ``ghost``, ``ghost_loss_fn(*batch_tensors)`` -> each example's loss
            ``[n]`` (its ``loss_fn`` alone), or their sum (a scalar).

    Returns:
        ``(sums, losses, results)``: one summed tensor per trained parameter, the per-example
        losses ``[B]`` (ghost with a summed loss: each example carries its chunk's mean loss), and the
        :class:`~privasr.dp.per_layer.ClipResult` of each chunk.
    """
    if grad_mode not in CORE_GRAD_MODES:
        raise ValueError(f"unknown grad_mode {grad_mode!r}; accepted: {', '.join(CORE_GRAD_MODES)}")
    params = [p for _, p in trainable_parameters(module)]
    batch = tensors[0].shape[0]
    sums, losses, results = None, [], []
    if grad_mode == "loop":
        for grads, loss in shard_grads_loop(module, loss_fn, tensors, batch):
            results.append(clipper([g.unsqueeze(0) for g in _dense(grads, params)]))
            losses.append(loss.view(1))
            sums = _add(sums, results[-1].summed)
        return sums, torch.cat(losses), results
    if grad_mode == "ghost" and ghost_loss_fn is None:
        raise ValueError("grad_mode 'ghost' needs ghost_loss_fn: each example's loss [n] (or their sum) from one "
                         "forward of the batch")
    for start in range(0, batch, micro_batch):
        chunk = [t[start:start + micro_batch] for t in tensors]
        size = chunk[0].shape[0]
        if grad_mode == "ghost":
            result, chunk_losses = ghost_clipped_sum(module, ghost_loss_fn, chunk, clipper)
        else:
            grads, chunk_losses = shard_grads_vmap(module, loss_fn, chunk, size)
            result = clipper(grads)
        results.append(result)
        chunk_losses = chunk_losses.reshape(-1)
        losses.append(chunk_losses if chunk_losses.numel() == size else (chunk_losses / size).expand(size))
        sums = _add(sums, result.summed)
    return sums, torch.cat(losses), results


def ghost_clipped_sum(module: torch.nn.Module, loss_fn, tensors: Sequence[torch.Tensor], clipper: PerLayerClipper):
    r"""Per-layer clipped sum of a chunk by ghost norms: no per-example gradient is formed.

    One recorded forward + backward (:func:`privasr.ghost.ghost_pass`) gives every example's
    squared norm per parameter, :math:`\|\nabla_{\theta_p}\ell_i\|^2`. Group :math:`k`'s norm is
    :math:`\sqrt{\sum_{p \in k} \|\nabla_{\theta_p}\ell_i\|^2}` and its factors
    :math:`f_{k,i}` come from :meth:`PerLayerClipper.factors_from_sq_norms` (the rule of
    :func:`~privasr.dp.per_layer.clip_per_layer`). The sum :math:`\sum_i f_{k,i} \nabla_{\theta_p}\ell_i`
    for :math:`p \in k` is book-keeping: every parameter's per-example gradient is a function of its
    own recorded activations and output gradients (:class:`privasr.ghost.GhostPass`), so each
    group is summed with its own factors -- one factor per (group, example), one backward in all.
    Non-finite examples get factor 0 and their rows are replaced by zeros (never ``0 * NaN``).

    Returns:
        ``(ClipResult, losses)``: what :func:`~privasr.dp.per_layer.clip_per_layer` returns for the
        vmap gradients of the chunk, and ``loss_fn``'s result (detached).
    """
    result = ghost_pass(module, loss_fn, tensors)
    if result.names != clipper.names:
        raise ValueError("the clipper's parameters are not the module's trained parameters in order; rebuild the "
                         "clipper after freezing (DPSGDBrain.clipper() does)")
    factors, finite, clipped = clipper.factors_from_sq_norms(result.sq_norms)
    params = [p for _, p in trainable_parameters(module)]
    # one pass over the records, each parameter weighted by its group's row of factors [K groups, B]
    totals = result.weighted_sum(factors, finite, [p.shape for p in params], rows=clipper.group_of)
    summed = [torch.zeros_like(p) if total is None else total for p, total in zip(params, totals)]  # unused: zero
    kept = int(finite.sum())
    return ClipResult(summed, kept, int(finite.numel()) - kept, clipped), result.losses


@dataclass
class DPStepStats:
    """What one DP-SGD step did on THIS process (the noisy update itself is the same on every process).

    Attributes:
        results: the :class:`~privasr.dp.per_layer.ClipResult` of every chunk clipped in the step.
        loss: the mean loss of the finite examples (NaN when there was none: an empty local batch).
        num_kept: examples that contributed; ``num_dropped``: examples dropped for a NaN/Inf gradient.
        clipped_fraction: per clipping group, the fraction of the kept examples that were clipped
            (``None`` when no example was kept).
    """

    results: List[ClipResult] = field(default_factory=list)
    loss: torch.Tensor = field(default_factory=lambda: torch.tensor(float("nan")))

    @property
    def num_kept(self) -> int:
        return sum(r.num_kept for r in self.results)

    @property
    def num_dropped(self) -> int:
        return sum(r.num_dropped for r in self.results)

    @property
    def clipped_fraction(self) -> Optional[torch.Tensor]:
        kept = self.num_kept
        if not kept:
            return None
        per_chunk = torch.tensor([r.clipped_fraction for r in self.results], dtype=torch.float64)
        weights = torch.tensor([r.num_kept for r in self.results], dtype=torch.float64).unsqueeze(1)
        return (per_chunk * weights).sum(0) / kept


class DPSGDStep:
    r"""Clip per example, add the noise once across processes, count the release (see the module docstring).

    Args:
        model: owns the trained parameters (``requires_grad``; frozen ones get no gradient, clipping
            budget or noise). Not wrapped in ``DistributedDataParallel``.
        clipper: a :class:`~privasr.dp.per_layer.PerLayerClipper` on ``model``'s *trained* parameters
            (build it after freezing); its ``max_norm`` is the sensitivity :math:`C`.
        noise_multiplier: :math:`\sigma \ge 0`; the noise's std is :math:`\sigma C`.
        expected_batch_size: the global :math:`qN` the noisy sum is divided by.
        noise: the :class:`~privasr.dp.noise.NoiseSource` (checkpoint it for an exact resume);
            ``None``: a secret seed from the OS. Only rank 0 draws from it.
        grad_mode: ``loop`` | ``vmap`` | ``ghost`` (see :func:`clipped_example_sum`).
        micro_batch: examples per vmap call or ghost pass (the memory bound).
        ledger: optional :class:`~privasr.accounting.PrivacyLedger`: :meth:`reduce` adds one step
            :math:`(\sigma, q)` to it, ``sample_rate`` being :math:`q`.
    """

    def __init__(self, model: torch.nn.Module, clipper: PerLayerClipper, noise_multiplier: float,
                 expected_batch_size: float, noise: Optional[NoiseSource] = None, grad_mode: str = "loop",
                 micro_batch: int = 8, ledger=None, sample_rate: Optional[float] = None):
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            raise ValueError("DPSGDStep needs the bare model, not a DistributedDataParallel/DataParallel wrapper: DDP "
                             "all-reduces the unclipped gradients during backward; pass model.module")
        if grad_mode not in CORE_GRAD_MODES:
            raise ValueError(f"unknown grad_mode {grad_mode!r}; accepted: {', '.join(CORE_GRAD_MODES)}")
        if isinstance(micro_batch, bool) or int(micro_batch) != micro_batch or micro_batch < 1:
            raise ValueError(f"micro_batch must be an integer >= 1, got {micro_batch!r}")
        if not (noise_multiplier >= 0.0 and float(noise_multiplier) < float("inf")):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
        if not expected_batch_size > 0.0:
            raise ValueError(f"expected_batch_size (q*N) must be > 0, got {expected_batch_size!r}")
        if ledger is not None and not (sample_rate is not None and 0.0 < sample_rate <= 1.0):
            raise ValueError(f"a ledger needs the sample_rate q in (0, 1] each step is counted with, got {sample_rate!r}")
        named = list(trainable_parameters(model))
        if [n for n, _ in named] != clipper.names:
            raise ValueError("the clipper's parameters are not the model's trained parameters in order; build the "
                             "PerLayerClipper on model.named_parameters() after freezing")
        self.model, self.clipper, self.params = model, clipper, [p for _, p in named]
        self.noise_multiplier, self.expected_batch_size = float(noise_multiplier), float(expected_batch_size)
        self.noise = NoiseSource(None) if noise is None else noise
        self.grad_mode, self.micro_batch = grad_mode, int(micro_batch)
        self.ledger, self.sample_rate = ledger, sample_rate
        self._sums: Optional[List[torch.Tensor]] = None
        self._results: List[ClipResult] = []
        self._losses: List[torch.Tensor] = []

    @property
    def max_norm(self) -> float:
        """The sensitivity :math:`C` of the clipped sum (the clipper's total bound)."""
        return self.clipper.max_norm

    def backward(self, loss_fn, *tensors: torch.Tensor, ghost_loss_fn=None) -> torch.Tensor:
        r"""Add :math:`\sum_i \mathrm{clip}(\nabla_\theta \ell(\theta; x_i))` of this batch to the step's sum.

        ``tensors`` hold the examples along dim 0; ``loss_fn(*one_example)`` is one example's scalar
        loss; ``ghost_loss_fn`` (``grad_mode="ghost"``) each example's loss ``[n]``, or their sum, from
        one forward of a chunk. Call again before :meth:`reduce` for more examples of the same step.
        Returns the mean loss of this batch's finite examples (detached; NaN if none).
        """
        if not tensors or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in tensors):
            raise ValueError("backward(loss_fn, *tensors) needs the batch tensors, each with the examples along dim 0")
        if any(t.shape[0] != tensors[0].shape[0] for t in tensors) or tensors[0].shape[0] == 0:
            raise ValueError(f"every batch tensor must hold the same number (>= 1) of examples along dim 0, got "
                             f"{[t.shape[0] for t in tensors]}; for an empty batch call reduce() alone")
        sums, losses, results = clipped_example_sum(self.model, loss_fn, tensors, self.clipper, self.grad_mode,
                                                    self.micro_batch, ghost_loss_fn)
        self._sums = _add(self._sums, sums)
        self._results += results
        self._losses.append(losses.detach())
        return _finite_mean(losses.detach())

    def noisy_mean(self, group=None):
        r"""End the step: :math:`\tilde g_t` (one tensor per trained parameter, the same on every process) and stats.

        A collective under ``torch.distributed``: every process of ``group`` calls it once per step,
        with or without examples of its own. Adds the step to the ledger.
        """
        sums = self._sums if self._sums is not None else [torch.zeros_like(p) for p in self.params]
        results, losses = self._results, self._losses
        self._sums, self._results, self._losses = None, [], []
        grads = privatize(sums, self.noise_multiplier, self.max_norm, self.expected_batch_size,
                          self.noise.generator, group=group)
        if self.ledger is not None:
            self.ledger.step(self.noise_multiplier, self.sample_rate)
        loss = _finite_mean(torch.cat(losses)) if losses else torch.tensor(float("nan"))
        return grads, DPStepStats(results, loss.cpu())

    def reduce(self, group=None) -> DPStepStats:
        """:meth:`noisy_mean`, written to ``p.grad`` of every trained parameter (then call ``optimizer.step()``)."""
        grads, stats = self.noisy_mean(group)
        for param, g in zip(self.params, grads):
            param.grad = g
        return stats


def _finite_mean(losses: torch.Tensor) -> torch.Tensor:
    finite = losses[torch.isfinite(losses)]
    return finite.mean() if finite.numel() else torch.tensor(float("nan"))
