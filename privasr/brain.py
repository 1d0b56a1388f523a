r"""A SpeechBrain ``Brain`` whose training step clips per core before the cross-core sum.

The step (Algorithm 1 of the per-core clipping paper, with the baselines)::

    for each micro-batch of the step:              # gradient accumulation
        split the local batch into K virtual cores  # privasr.per_sample
        per-core gradient  ḡ_c  (vmap or loop)
        accumulate  f_c · ḡ_c                        # privasr.distributed.CoreAccumulator
    one SUM all_reduce (+ one MIN for APCC), then mean over the cores kept
    optimizer step (skipped if every core was non-finite)

``clipping`` selects ``none | global | pcc | apcc | pec``; ``pec`` is ``pcc`` with one
example per core (per-example clipping, DP-SGD without noise). The modules are NOT
wrapped in ``DistributedDataParallel``: its automatic all-reduce would sum the
unclipped gradients; parameters are broadcast from rank 0 once instead.

Subclasses implement two methods for training (evaluation keeps SpeechBrain's
``compute_forward``/``compute_objectives``):

* ``batch_to_tensors(batch) -> tuple[Tensor, ...]``: the tensors of a batch, each with
  the batch on dim 0 (e.g. ``wavs, wav_lens, tokens, token_lens``), on ``self.device``.
* ``shard_loss(*tensors) -> Tensor``: the scalar mean loss of a shard, computed through
  ``self.modules`` (it is called under ``torch.func`` for the vmap mode, so no in-place
  updates of buffers and no data-dependent Python control flow).

Hyper-parameters read from ``hparams`` (all declared in the recipe YAML):
``clipping``, ``clip_bound``, ``virtual_cores``, ``reduction``, ``core_grad_mode``
(``vmap`` | ``loop``), ``log_every_n_steps``, ``tensorboard_dir`` (optional).
"""
from __future__ import annotations

import logging
from typing import Optional

import speechbrain as sb
import torch

from privasr.clipping import AggregationStats, check_method
from privasr.distributed import CoreAccumulator, broadcast_parameters, gather_norms, world_info
from privasr.per_sample import shard_grads_loop, shard_grads_vmap, trainable_parameters

logger = logging.getLogger(__name__)

CLIPPING_CHOICES = ("none", "global", "pcc", "apcc", "pec")
CORE_GRAD_MODES = ("vmap", "loop")


class ClippingConfig:
    """The validated clipping settings of a run (one place that knows the choices)."""

    def __init__(self, clipping: str = "none", clip_bound: Optional[float] = None, virtual_cores: int = 1,
                 reduction: str = "mean", core_grad_mode: str = "loop"):
        if clipping not in CLIPPING_CHOICES:
            raise ValueError(f"unknown clipping {clipping!r}; accepted: {', '.join(CLIPPING_CHOICES)}")
        if core_grad_mode not in CORE_GRAD_MODES:
            raise ValueError(f"unknown core_grad_mode {core_grad_mode!r}; accepted: {', '.join(CORE_GRAD_MODES)}")
        if int(virtual_cores) < 1:
            raise ValueError(f"virtual_cores must be >= 1, got {virtual_cores}")
        self.clipping, self.clip_bound = clipping, clip_bound
        check_method(self.method, clip_bound, reduction)
        self.virtual_cores, self.reduction, self.core_grad_mode = int(virtual_cores), reduction, core_grad_mode

    @property
    def method(self) -> str:
        """The aggregation method of :mod:`privasr.clipping` (pec clips like pcc)."""
        return "pcc" if self.clipping == "pec" else self.clipping

    def num_shards(self, batch_size: int) -> int:
        """Cores this process emulates for a batch: one per example for pec."""
        return batch_size if self.clipping == "pec" else min(self.virtual_cores, batch_size)

    @classmethod
    def from_hparams(cls, hparams) -> "ClippingConfig":
        get = lambda name, default: getattr(hparams, name, default)  # noqa: E731
        return cls(get("clipping", "none"), get("clip_bound", None), get("virtual_cores", 1),
                   get("reduction", "mean"), get("core_grad_mode", "loop"))


@sb.utils.checkpoints.register_checkpoint_hooks
class RunCounters:
    """Fault counters that must survive a resume: skipped steps, dropped cores, inf-loss utterances."""

    def __init__(self):
        self.skipped_steps = 0
        self.dropped_cores = 0
        self.infinite_loss_utterances = 0

    @sb.utils.checkpoints.mark_as_saver
    def _save(self, path):
        torch.save(vars(self), path)

    @sb.utils.checkpoints.mark_as_loader
    def _load(self, path, end_of_epoch=False):
        vars(self).update(torch.load(path))


class PrivateBrain(sb.Brain):
    """``sb.Brain`` with per-core (or per-example) clipping in ``fit_batch``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.clip_config = ClippingConfig.from_hparams(self.hparams)
        self._accumulator: Optional[CoreAccumulator] = None
        self._tb_writer = None
        self.counters = RunCounters()
        if self.checkpointer is not None:
            self.checkpointer.add_recoverable("run_counters", self.counters)
        self.last_stats: Optional[AggregationStats] = None

    # -- the two methods a recipe implements -------------------------------------------
    def batch_to_tensors(self, batch) -> tuple:
        raise NotImplementedError("a PrivateBrain subclass must define batch_to_tensors(batch)")

    def shard_loss(self, *tensors) -> torch.Tensor:
        raise NotImplementedError("a PrivateBrain subclass must define shard_loss(*tensors)")

    # -- distributed set-up: no DDP wrapper -------------------------------------------
    def _wrap_distributed(self):
        """Keep modules unwrapped (DDP would all-reduce unclipped gradients); sync start."""
        broadcast_parameters(self.modules)

    # -- the training step ------------------------------------------------------------
    def fit_batch(self, batch):
        should_step = (self.step % self.grad_accumulation_factor) == 0
        self.on_fit_batch_start(batch, should_step)
        tensors = self.batch_to_tensors(batch)
        if self._accumulator is None:
            self._accumulator = self._new_accumulator()
        with self.training_ctx:
            loss = self._accumulate_cores(tensors)
        if should_step:
            self._apply_step()
        self.on_fit_batch_end(batch, None, loss, should_step)
        return loss.detach().cpu()

    def _new_accumulator(self) -> CoreAccumulator:
        params = [p for _, p in trainable_parameters(self.modules)]
        cfg = self.clip_config
        return CoreAccumulator(params, cfg.method, cfg.clip_bound, cfg.reduction)

    def _accumulate_cores(self, tensors) -> torch.Tensor:
        """Per-core gradients of this micro-batch into the accumulator; returns the mean loss."""
        num_shards = self.clip_config.num_shards(tensors[0].shape[0])
        divisible = tensors[0].shape[0] % num_shards == 0
        if self.clip_config.core_grad_mode == "vmap" and divisible:
            grads, losses = shard_grads_vmap(self.modules, self.shard_loss, tensors, num_shards)
            self._accumulator.add_cores(grads)
            return losses.mean()
        losses = []
        for grads, loss in shard_grads_loop(self.modules, self.shard_loss, tensors, num_shards):
            self._accumulator.add_core(grads)
            losses.append(loss)
        return torch.stack(losses).mean()

    def _apply_step(self) -> None:
        grads, stats = self._accumulator.reduce()
        self._accumulator = None
        self.last_stats = stats
        self.counters.dropped_cores += len(stats.dropped)
        if stats.dropped:
            logger.warning("dropped %d core(s) with non-finite gradients (local indices %s)",
                           len(stats.dropped), stats.dropped)
        if stats.skipped:
            self.counters.skipped_steps += 1
            logger.warning("every core was non-finite: optimizer step skipped (%d so far)",
                           self.counters.skipped_steps)
            self._check_nonfinite_patience()
        else:
            self._step_optimizers(grads)
        self._log_step(stats)

    def _check_nonfinite_patience(self) -> None:
        if self.counters.skipped_steps > self.nonfinite_patience:
            raise RuntimeError(
                f"{self.counters.skipped_steps} optimizer steps skipped because every core's gradient was non-finite "
                f"(patience nonfinite_patience={self.nonfinite_patience}); stopping"
            )

    def _step_optimizers(self, grads) -> None:
        for (_, param), g in zip(trainable_parameters(self.modules), grads):
            param.grad = g
        for opt in self._valid_optimizers().values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.optimizer_step += 1

    def _valid_optimizers(self) -> dict:
        if self.optimizers_dict is not None:
            return self.freeze_optimizers(self.optimizers_dict)
        return {"optimizer": self.optimizer}

    # -- logging ----------------------------------------------------------------------
    def _log_step(self, stats: AggregationStats) -> None:
        every = int(getattr(self.hparams, "log_every_n_steps", 0) or 0)
        if every <= 0 or self.optimizer_step % every != 0:
            return
        norms = gather_norms(stats.core_norms)  # collective: every rank takes part
        rank, _ = world_info()
        writer = self._tensorboard()
        if rank != 0 or writer is None:
            return
        finite = norms[torch.isfinite(norms)]
        step = self.optimizer_step
        if finite.numel():
            writer.add_scalar("clipping/core_norm_min", float(finite.min()), step)
            writer.add_scalar("clipping/core_norm_median", float(finite.median()), step)
            writer.add_scalar("clipping/core_norm_max", float(finite.max()), step)
        writer.add_scalar("clipping/clipped_fraction_local", stats.clipped_fraction, step)
        if stats.bound is not None:
            writer.add_scalar("clipping/bound", stats.bound, step)
        writer.add_scalar("clipping/dropped_cores_total", self.counters.dropped_cores, step)
        writer.add_scalar("clipping/skipped_steps_total", self.counters.skipped_steps, step)

    def _tensorboard(self):
        directory = getattr(self.hparams, "tensorboard_dir", None)
        if directory is None:
            return None
        if self._tb_writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb_writer = SummaryWriter(directory)
        return self._tb_writer
