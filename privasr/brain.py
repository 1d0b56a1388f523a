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

The classes: :class:`PrivasrBrain` holds the infrastructure every privasr Brain needs (no DDP
wrapper, atomic checkpoints, RNG state, :class:`RunCounters`, the bucket sampler and the
per-epoch loader seed, the intra-epoch checkpoint guard, the run-option checks, applying an
aggregated update); :class:`PerCoreBrain` (also named ``PrivateBrain``, the name recipes and
checkpoints know) adds the per-core step above.

Subclasses implement two methods for training (evaluation keeps SpeechBrain's
``compute_forward``/``compute_objectives``):

* ``batch_to_tensors(batch) -> tuple[Tensor, ...]``: the tensors of a batch, each with
  the batch on dim 0 (e.g. ``wavs, wav_lens, tokens, token_lens``), on ``self.device``.
* ``shard_loss(*tensors) -> Tensor``: the scalar mean loss of a shard, computed through
  ``self.modules`` (it is called under ``torch.func`` for the vmap mode, so no in-place
  updates of buffers and no data-dependent Python control flow).

Hyper-parameters read from ``hparams`` (all declared in the recipe YAML):
``clipping``, ``clip_bound``, ``virtual_cores``, ``reduction``, ``core_grad_mode``
(``loop`` | ``vmap`` | ``ghost``: see :func:`privasr.private_step.accumulate_cores`; ghost needs
:meth:`PrivasrBrain.shard_loss_reduction`), ``log_every_n_steps``, ``tensorboard_dir`` (optional),
``core_log_dir`` (optional: each core's norm, clip scale and :meth:`shard_labels` label
per step, see :mod:`privasr.core_log`), and SpeechBrain's ``nonfinite_patience``,
``ckpt_interval_minutes`` / ``ckpt_interval_steps``.

SpeechBrain's run options (``--max_grad_norm`` etc.): the step bypasses
``sb.Brain.optimizers_step``, so the options that act there are re-implemented on the
*aggregated* update in :meth:`PrivateBrain._final_update` (``skip_nonfinite_grads``, then
``max_grad_norm``), and the options that cannot be composed with per-core clipping are
refused by :func:`check_run_options` before anything is built (``--precision fp16``,
``--data_parallel_backend``, ``--compile``, ``--jit``, ...). ``max_grad_norm`` applies only
when given (command line or YAML key): SpeechBrain's implicit default of 5.0 would silently
add global clipping to every ``clipping`` method, ``none`` included.

Faults (see :mod:`privasr.resume` and :mod:`privasr.errors`):

* resuming is exact: the checkpointer is made atomic, and the RNG states of every process
  (:class:`privasr.resume.RandomState`) and :class:`RunCounters` are checkpointed with the
  model, optimizer, data position and step counters; intra-epoch checkpoints are taken
  only between optimizer steps (never inside gradient accumulation);
  ``ckpt_interval_steps > 0`` replaces ``ckpt_interval_minutes``;
* a core with a NaN/Inf gradient is dropped, counted and logged with its index; a step
  whose every core is non-finite is skipped; more than ``nonfinite_patience`` skipped
  steps in a run raise :class:`privasr.errors.NonFiniteGradientsError`;
* ``pcc``/``pec``/``global`` with a bound that clipped nothing in the first epoch are
  warned about, with the measured norms (such a run is unclipped training).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Optional

import speechbrain as sb
import torch

from privasr.clipping import (AggregationStats, check_method, clipped_fraction, core_norm, global_clip_factor,
                              shrunk_cores)
from privasr.core_log import CoreLog
from privasr.distributed import ALLREDUCE_DTYPES, CoreAccumulator, broadcast_parameters, gather_norms, world_info
from privasr.errors import NonFiniteGradientsError, UserError
from privasr.per_sample import trainable_parameters
from privasr.private_step import CORE_GRAD_MODES, STRATEGIES, accumulate_cores, unequal_cores_message
from privasr.resume import PerRankState, RandomState, make_atomic, register_per_rank, seed_for_epoch
from privasr.sampling import DurationBucketSampler

logger = logging.getLogger(__name__)

#: ``clipping`` choices and ``core_grad_mode`` choices: privasr.private_step's lists (one source).
CLIPPING_CHOICES = STRATEGIES


class ClippingConfig:
    """The validated clipping settings of a run (one place that knows the choices)."""

    def __init__(self, clipping: str = "none", clip_bound: Optional[float] = None, virtual_cores: int = 1,
                 reduction: str = "mean", core_grad_mode: str = "loop", allreduce_dtype: str = "float32"):
        if clipping not in CLIPPING_CHOICES:
            raise ValueError(f"unknown clipping {clipping!r}; accepted: {', '.join(CLIPPING_CHOICES)}")
        if core_grad_mode not in CORE_GRAD_MODES:
            raise ValueError(f"unknown core_grad_mode {core_grad_mode!r}; accepted: {', '.join(CORE_GRAD_MODES)}")
        if int(virtual_cores) < 1:
            raise ValueError(f"virtual_cores must be >= 1, got {virtual_cores}")
        self.clipping, self.clip_bound = clipping, clip_bound
        check_method(self.method, clip_bound, reduction)
        self.virtual_cores, self.reduction, self.core_grad_mode = int(virtual_cores), reduction, core_grad_mode
        if allreduce_dtype not in ALLREDUCE_DTYPES:
            raise ValueError(f"unknown allreduce_dtype {allreduce_dtype!r}; accepted: {', '.join(ALLREDUCE_DTYPES)}")
        self.allreduce_dtype = ALLREDUCE_DTYPES[allreduce_dtype]

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
                   get("reduction", "mean"), get("core_grad_mode", "loop"), get("allreduce_dtype", "float32"))


@register_per_rank
class RunCounters(PerRankState):
    """Fault counters that must survive a resume: skipped steps, dropped cores, inf-loss utterances.

    Kept per process (dropped cores and infeasible utterances are those of this rank's
    shards; skipped steps are the same on every rank) and checkpointed per rank.
    """

    def __init__(self):
        self.skipped_steps = 0
        self.dropped_cores = 0
        self.infinite_loss_utterances = 0

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


class ClippingMonitor:
    """How often clipping acted during an epoch, to catch a bound that never clips.

    ``pcc``/``pec`` clip a core when its norm exceeds the bound; ``global`` clips the
    aggregate. With a bound above every norm the run is plain unclipped training, which a
    privacy toolkit must not let pass silently.
    """

    def __init__(self):
        self.norms: list[torch.Tensor] = []
        self.clipped = 0

    def add(self, stats: AggregationStats, aggregate_norm: Optional[float] = None) -> None:
        """Record one step: per-core norms, or the aggregate's norm (global clipping)."""
        if aggregate_norm is not None:
            self.norms.append(torch.tensor([aggregate_norm], dtype=torch.float64))
            self.clipped += int(stats.global_factor < 1.0)
            return
        norms = stats.core_norms.to(torch.float64)
        self.norms.append(norms[torch.isfinite(norms)])
        self.clipped += int(shrunk_cores(stats.core_norms, stats.factors).sum())

    def summary(self) -> tuple[int, torch.Tensor]:
        """``(number clipped, every norm)`` over all processes (a collective)."""
        local = torch.cat(self.norms) if self.norms else torch.zeros(0, dtype=torch.float64)
        norms = gather_norms(local)
        clipped = [self.clipped]
        if world_info()[1] > 1:
            clipped = [None] * world_info()[1]
            torch.distributed.all_gather_object(clipped, self.clipped)
        return sum(clipped), norms


# -- SpeechBrain's run options ------------------------------------------------------------
class UnsupportedRunOption(UserError, ValueError):
    """A SpeechBrain run option privasr cannot honour; one line saying why and what to use instead.

    A :class:`~privasr.errors.UserError` (``train.py: error: ...``, exit status 2 through
    :func:`privasr.cli.run_cli`) and a ``ValueError`` (what ``sb.Brain`` raises on bad options).
    """


def run_option(name: str, run_opts=None, hparams=None):
    """``(value, explicit)`` of a SpeechBrain run option, resolved as ``sb.Brain.__init__`` does.

    Priority: the command line (``RunOptions.overridden_args``; every key of a ``dict``
    run_opts) > a key of ``hparams`` > ``RunOptions``' default. ``explicit`` is False only
    for the default.
    """
    from speechbrain.utils.run_opts import RunOptions

    if run_opts is not None:
        given = run_opts.keys() if isinstance(run_opts, dict) else getattr(run_opts, "overridden_args", ())
        if name in given:
            return run_opts[name], True
    if hparams is not None:
        source = hparams if isinstance(hparams, dict) else vars(hparams)
        if name in source:
            return source[name], True
    return getattr(RunOptions(), name), False


_FP16_WHY = ("per-core clipping computes each core's gradient outside SpeechBrain's GradScaler, so fp16 gradients "
             "would underflow unscaled; use --precision bf16 (fp32's exponent range, no loss scaling) or fp32")
_NOT_WITH_CORES = {  # a flag privasr refuses -> why, and what to use instead
    "data_parallel_backend": "privasr clips each virtual core's gradient itself and torch.nn.DataParallel would "
                             "sum unclipped replicas (privasr does not wrap modules in it); use torchrun "
                             "--nproc_per_node N, or --virtual_cores K in one process",
    "compile": "per-core gradients are taken with torch.func (vmap) and per-shard autograd, which privasr has not "
               "verified on torch.compile'd modules; run without it",
    "jit": "per-core gradients are taken with torch.func (vmap) and per-shard autograd, which privasr has not "
           "verified on TorchScript modules; run without it",
    "log_config": "privasr's recipes log with SpeechBrain's default configuration (to <output_folder>/log.txt) "
                  "and would ignore this file; drop the option",
}
_ALIASES = {"compile_module_keys": "compile", "jit_module_keys": "jit"}


def check_run_options(run_opts=None, hparams=None) -> None:
    """Refuse the SpeechBrain run options a :class:`PrivateBrain` cannot honour, before anything is built.

    Raises :class:`UnsupportedRunOption` (one line) for: ``precision: fp16`` and
    ``auto_mix_prec`` (see ``_FP16_WHY``), ``eval_precision: fp16`` without CUDA (SpeechBrain
    has no fp16 autocast on CPU), ``data_parallel_backend``, ``compile``/``compile_module_keys``,
    ``jit``/``jit_module_keys``, ``log_config``; a non-finite ``max_grad_norm``;
    ``grad_accumulation_factor < 1``, ``nonfinite_patience < 0``, ``optimizer_step_limit < 1``;
    and, under torchrun, a ``distributed_backend`` that ``ddp_init_group`` would reject.
    Everything else is honoured (see the README's table of run options).
    """
    def get(name):
        return run_option(name, run_opts, hparams)[0]

    if get("precision") == "fp16":
        raise UnsupportedRunOption(f"--precision fp16 is not supported: {_FP16_WHY}")
    if get("auto_mix_prec"):
        raise UnsupportedRunOption(f"--auto_mix_prec (= --precision fp16) is not supported: {_FP16_WHY}")
    for flag in ("data_parallel_backend", "compile", "jit", "compile_module_keys", "jit_module_keys", "log_config"):
        if get(flag) not in (None, False):
            raise UnsupportedRunOption(f"--{flag} is not supported: {_NOT_WITH_CORES[_ALIASES.get(flag, flag)]}")
    device = get("device") or sb.utils.distributed.infer_device()
    if get("eval_precision") == "fp16" and not str(device).startswith("cuda"):
        raise UnsupportedRunOption(f"--eval_precision fp16 needs a CUDA device (SpeechBrain has no fp16 autocast on "
                                   f"{device}); use --eval_precision bf16")
    _check_numbers(get)
    _check_distributed_backend(get("distributed_backend"))


def _check_numbers(get) -> None:
    max_grad_norm = get("max_grad_norm")
    if not (isinstance(max_grad_norm, (int, float)) and math.isfinite(max_grad_norm)):
        raise UnsupportedRunOption(f"--max_grad_norm must be a finite number (> 0 clips the aggregated update to "
                                   f"that norm, <= 0 disables it), got {max_grad_norm!r}")
    if get("grad_accumulation_factor") < 1:
        raise UnsupportedRunOption(f"--grad_accumulation_factor must be >= 1, got {get('grad_accumulation_factor')}")
    if get("nonfinite_patience") < 0:
        raise UnsupportedRunOption(f"--nonfinite_patience must be >= 0, got {get('nonfinite_patience')}")
    for name in ("ckpt_interval_minutes", "ckpt_interval_steps"):
        value = get(name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise UnsupportedRunOption(f"--{name} must be >= 0 (0: off), got {value!r}")
    limit = get("optimizer_step_limit")
    if limit is not None and _step_limit(limit) is None:
        raise UnsupportedRunOption(f"--optimizer_step_limit must be an integer >= 1 (omit it to train every epoch), "
                                   f"got {limit!r}")


def _step_limit(value) -> Optional[int]:
    """``optimizer_step_limit`` as an integer >= 1, else None; SpeechBrain's parser leaves it a string."""
    try:
        limit = int(str(value))
    except ValueError:
        return None
    return limit if limit >= 1 else None


def _check_distributed_backend(backend) -> None:
    """Under torchrun, what ``sb.utils.distributed.ddp_init_group`` would reject with a traceback."""
    if os.environ.get("RANK") is None or os.environ.get("LOCAL_RANK") is None:
        return
    if backend not in ("nccl", "gloo", "mpi"):
        raise UnsupportedRunOption(f"unknown --distributed_backend {backend!r}; accepted: nccl, gloo, mpi")
    if backend != "gloo" and int(os.environ["LOCAL_RANK"]) + 1 > torch.cuda.device_count():
        raise UnsupportedRunOption(f"--distributed_backend {backend} needs a CUDA device per process "
                                   f"({torch.cuda.device_count()} found); use --distributed_backend gloo on CPU")


def _one_checkpoint_interval(hparams, run_opts):
    """``ckpt_interval_steps > 0`` replaces ``ckpt_interval_minutes`` (SpeechBrain refuses both)."""
    def get(source, name):
        if source is None:
            return 0
        value = source.get(name, 0) if isinstance(source, dict) else getattr(source, name, 0)
        return value or 0

    if max(get(hparams, "ckpt_interval_steps"), get(run_opts, "ckpt_interval_steps")) <= 0:
        return hparams, run_opts
    if get(hparams, "ckpt_interval_minutes") > 0:
        hparams = {**hparams, "ckpt_interval_minutes": 0}
    if get(run_opts, "ckpt_interval_minutes") > 0:
        run_opts = ({**run_opts, "ckpt_interval_minutes": 0} if isinstance(run_opts, dict)
                    else dataclasses.replace(run_opts, ckpt_interval_minutes=0))
    return hparams, run_opts


class PrivasrBrain(sb.Brain):
    """The infrastructure every privasr Brain needs, whatever its training step.

    * SpeechBrain's run options checked before ``sb.Brain`` acts on them (:func:`check_run_options`),
      ``ckpt_interval_steps`` replacing ``ckpt_interval_minutes``, ``max_grad_norm`` only when given;
    * no DDP wrapper: the parameters are broadcast from rank 0 once (a private step reduces its
      clipped gradients itself);
    * exact resume: an atomic checkpointer, every process's RNG state and :class:`RunCounters`
      checkpointed, the training loader's per-epoch seed from its own generator, intra-epoch
      checkpoints only between optimizer steps;
    * the duration bucket sampler (``bucket_batches``);
    * applying an aggregated update (:meth:`_step_optimizers`: SpeechBrain's ``optimizers_step``
      options on that update), the non-finite patience, the TensorBoard writer.

    A subclass defines the training step (``fit_batch``): :class:`PerCoreBrain` (per-core and
    per-example clipping) and :class:`privasr.dp.brain.DPSGDBrain` (DP-SGD, whose step is
    :class:`privasr.dp.step.DPSGDStep`), siblings over this class.
    """

    def __init__(self, modules=None, opt_class=None, hparams=None, run_opts=None, checkpointer=None):
        check_run_options(run_opts, hparams)  # before sb.Brain acts on any of them
        hparams, run_opts = _one_checkpoint_interval(hparams, run_opts)
        super().__init__(modules, opt_class, hparams, run_opts, make_atomic(checkpointer))
        # SpeechBrain's max_grad_norm only when asked for (its default 5.0 would clip every run globally)
        explicit = run_option("max_grad_norm", run_opts, hparams)[1]
        self.update_max_norm: Optional[float] = (
            float(self.max_grad_norm) if explicit and self.max_grad_norm > 0 else None)
        self.last_update_factor = 1.0
        if self.optimizer_step_limit is not None:  # "3" from the command line: sb.Brain would compare int >= str
            self.optimizer_step_limit = _step_limit(self.optimizer_step_limit)
        self._tb_writer = None
        self.counters = RunCounters()
        self.random_state = RandomState()
        if self.checkpointer is not None:
            self.checkpointer.add_recoverable("run_counters", self.counters)
            # optional: checkpoints written before RNG states were saved still load
            self.checkpointer.add_recoverable("random_state", self.random_state, optional_load=True)

    # -- the two methods a recipe implements -------------------------------------------
    def batch_to_tensors(self, batch) -> tuple:
        raise NotImplementedError(f"{type(self).__name__} must define batch_to_tensors(batch) (the recipe contract of "
                                  "PrivasrBrain: the batch's tensors, examples along dim 0)")

    def shard_loss(self, *tensors) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define shard_loss(*tensors) (the recipe contract of "
                                  "PrivasrBrain: the scalar mean loss of a shard)")

    # -- an optional recipe hook (both steps' ghost mode) ---------------------------------
    def shard_loss_reduction(self) -> Optional[str]:
        """How :meth:`shard_loss` reduces over a shard's examples: ``"mean"`` (the default) or ``"sum"``.

        An optional recipe hook, read by ``core_grad_mode: ghost`` of both steps (the per-core one
        and DP-SGD's without ``example_losses``), which runs every core in ONE forward of the batch and
        needs the batch's loss to be the sum of the cores' losses; that holds when the shard loss
        is the mean (or the sum) over its examples of a per-example loss. A recipe whose loss is
        neither (e.g. a mean over frames pooled across the shard's examples) returns ``None``, and
        ghost is refused with an error; loop and vmap do not use this.
        """
        return "mean"

    # -- distributed set-up: no DDP wrapper -------------------------------------------
    # A SpeechBrain private method: sb.Brain wraps the modules in DDP whenever a process group
    # exists, and offers no public option to keep them bare; DDP would all-reduce the UNCLIPPED
    # gradients during backward.
    def _wrap_distributed(self):
        """Keep modules unwrapped (DDP would all-reduce unclipped gradients); sync start."""
        broadcast_parameters(self.modules)

    # -- data order and checkpoints ------------------------------------------------------
    def make_dataloader(self, dataset, stage, ckpt_prefix="dataloader-", **loader_kwargs):
        """SpeechBrain's loaders; the training loader draws its per-epoch seed from its own generator.

        A ``DataLoader`` draws its workers' base seed from the global torch RNG at the start
        of every epoch; a dedicated generator, reseeded from ``(seed, epoch)`` by
        :meth:`_fit_train`, keeps that draw out of the streams a resume restores.
        """
        own_generator = stage == sb.Stage.TRAIN and loader_kwargs.get("generator") is None
        if own_generator:
            loader_kwargs = {**loader_kwargs, "generator": torch.Generator()}
        sampler = self._bucket_sampler(dataset, loader_kwargs) if stage == sb.Stage.TRAIN else None
        if sampler is not None:
            loader_kwargs = {**loader_kwargs, "sampler": sampler, "shuffle": False}
        loader = super().make_dataloader(dataset, stage, ckpt_prefix, **loader_kwargs)
        if sampler is not None and self.train_sampler is None:  # one process: SpeechBrain set no train_sampler
            self.train_sampler = sampler  # so that fit() calls its set_epoch
        if own_generator:
            loader.privasr_epoch_generator = loader_kwargs["generator"]
        return loader

    def _bucket_sampler(self, dataset, loader_kwargs) -> Optional[DurationBucketSampler]:
        """``bucket_batches > 0`` with shuffled batches: a :class:`privasr.sampling.DurationBucketSampler`."""
        windows = int(getattr(self.hparams, "bucket_batches", 0) or 0)
        if windows <= 0 or not loader_kwargs.get("shuffle", False):
            return None
        if loader_kwargs.get("sampler") is not None or loader_kwargs.get("batch_sampler") is not None:
            raise ValueError("bucket_batches > 0 makes its own sampler: remove the loader's sampler/batch_sampler")
        durations = [float(dataset.data[uid]["duration"]) for uid in dataset.data_ids]
        return DurationBucketSampler(durations, int(loader_kwargs["batch_size"]), windows, self._seed(),
                                     world_info()[1])


    # A SpeechBrain private method: the loader's generator must be reseeded on every rank before
    # the epoch's iterator is made, and the only public hook there, on_stage_start, is overridden by
    # the recipes without calling super() (ASRBrain, BestRQRecipe), which would silently drop it.
    def _fit_train(self, train_set, epoch, enable):
        generator = getattr(train_set, "privasr_epoch_generator", None)
        if generator is not None:
            generator.manual_seed(seed_for_epoch(self._seed(), epoch))
        super()._fit_train(train_set, epoch, enable)
        self.on_train_epoch_end(epoch)
        if self._tb_writer is not None:  # an epoch's statistics on disk now, not at the writer's next timer
            self._tb_writer.flush()

    def on_train_epoch_end(self, epoch) -> None:
        """After each training epoch, on every process (collectives allowed); nothing by default."""

    def _seed(self) -> int:
        seed = getattr(self.hparams, "seed", None)
        return int(seed if isinstance(seed, int) else os.environ.get("SB_GLOBAL_SEED", 0))

    # A SpeechBrain private method: the one place sb.Brain decides on an intra-epoch checkpoint;
    # no public hook can veto it.
    def _should_save_intra_epoch_ckpt(self, last_ckpt_time, steps_since_ckpt):
        """Never inside gradient accumulation: a half-accumulated step is not part of a checkpoint."""
        if self.step % self.grad_accumulation_factor != 0:
            return False
        return super()._should_save_intra_epoch_ckpt(last_ckpt_time, steps_since_ckpt)

    # -- applying an aggregated update -----------------------------------------------------
    def _check_nonfinite_patience(self) -> None:
        if self.counters.skipped_steps > self.nonfinite_patience:
            raise NonFiniteGradientsError(
                f"training stopped: {self.counters.skipped_steps} optimizer steps skipped because every core's "
                f"gradient was NaN/Inf (more than nonfinite_patience={self.nonfinite_patience}); check the data "
                f"and the learning rate, or raise --nonfinite_patience"
            )

    def _step_optimizers(self, grads) -> None:
        grads = self._final_update(grads)
        for (_, param), g in zip(trainable_parameters(self.modules), grads):
            param.grad = g
        for opt in self._valid_optimizers().values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.optimizer_step += 1

    def _final_update(self, grads) -> list:
        r"""SpeechBrain's ``optimizers_step`` options, applied to the aggregated update :math:`g`.

        Per-core clipping has already dropped every non-finite core, so these act on the
        update the optimizer is about to take (identical on every process), in this order:

        1. ``skip_nonfinite_grads``: a parameter whose aggregated gradient holds a NaN/Inf
           gets ``None`` (not updated this step), as ``sb.Brain.check_gradients`` does; done
           first so that one such parameter cannot make the norm of step 2 NaN.
        2. ``max_grad_norm`` :math:`m > 0` (when given): :math:`g \leftarrow g \cdot
           \min(1, m / \lVert g \rVert)` with the norm over *all* trainable parameters
           (SpeechBrain clips ``param_groups[0]`` only); the maths of ``global`` clipping
           (:func:`privasr.clipping.core_norm`, :func:`privasr.clipping.global_clip_factor`).

        Returns a new list; ``grads`` is not modified. Sets :attr:`last_update_factor`.
        """
        if self.skip_nonfinite_grads:
            grads = self._drop_nonfinite_parameters(grads)
        self.last_update_factor = 1.0
        if self.update_max_norm is not None:
            self.last_update_factor = global_clip_factor(float(core_norm(grads)), self.update_max_norm)
            grads = [None if g is None else g * self.last_update_factor for g in grads]
        return list(grads)

    def _drop_nonfinite_parameters(self, grads) -> list:
        kept = []
        for (name, _), g in zip(trainable_parameters(self.modules), grads):
            if g is not None and not torch.isfinite(g).all():
                logger.warning("step %d: the aggregated gradient of %s holds NaN/Inf: not updated "
                               "(skip_nonfinite_grads)", self.optimizer_step + 1, name)
                g = None
            kept.append(g)
        return kept

    def _valid_optimizers(self) -> dict:
        if self.optimizers_dict is not None:
            return self.freeze_optimizers(self.optimizers_dict)
        return {"optimizer": self.optimizer}

    def _tensorboard(self):
        directory = getattr(self.hparams, "tensorboard_dir", None)
        if directory is None:
            return None
        if self._tb_writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb_writer = SummaryWriter(directory)
        return self._tb_writer


class PerCoreBrain(PrivasrBrain):
    """``sb.Brain`` with per-core (or per-example) clipping in ``fit_batch``."""

    def __init__(self, modules=None, opt_class=None, hparams=None, run_opts=None, checkpointer=None):
        super().__init__(modules, opt_class, hparams, run_opts, checkpointer)
        self.clip_config = ClippingConfig.from_hparams(self.hparams)
        if self.clip_config.core_grad_mode == "ghost" and type(self).fit_batch is not PerCoreBrain.fit_batch:
            # ghost lives in the per-core step (_accumulate_cores); a Brain with its own fit_batch
            # would otherwise run another mode under the name 'ghost'
            raise ValueError(f"core_grad_mode 'ghost' is implemented by PrivateBrain's per-core step; "
                             f"{type(self).__name__} trains with its own fit_batch, which does not use it: "
                             f"choose loop or vmap")
        self._accumulator: Optional[CoreAccumulator] = None
        self.last_stats: Optional[AggregationStats] = None
        core_log_dir = getattr(self.hparams, "core_log_dir", None)
        self._core_log = CoreLog(core_log_dir, world_info()[0]) if core_log_dir else None
        self._core_labels: Optional[list] = []
        self._warned_unequal_shards = False
        self._clip_monitor: Optional[ClippingMonitor] = (
            ClippingMonitor() if self.clip_config.clipping in ("pcc", "pec", "global") else None)

    # -- optional recipe hooks of the per-core step ----------------------------------------
    def trim_shard(self, *tensors) -> tuple:
        """Optional: a core's tensors without the padding it does not need (``trim_shards: true``, loop mode).

        The default keeps them as they are. A recipe whose model ignores padding returns the
        shard cut to its own longest example (see :meth:`privasr.asr.ASRBrain.trim_shard`): the
        core's gradient is unchanged and its forward/backward costs only its own frames.
        """
        return tensors

    def shard_labels(self, batch, num_shards: int) -> Optional[list]:
        """Optional: an integer label per core of ``batch`` for the core log (e.g. its canary count).

        ``None`` (the default) logs nothing. See :mod:`privasr.core_log`; shards are split as
        :func:`privasr.core_log.shard_partition` splits the batch's examples.
        """
        return None

    # -- the training step ------------------------------------------------------------
    def fit_batch(self, batch):
        should_step = (self.step % self.grad_accumulation_factor) == 0
        self.on_fit_batch_start(batch, should_step)
        tensors = self.batch_to_tensors(batch)
        if self._accumulator is None:
            self._accumulator = self._new_accumulator()
            self._core_labels = []
        num_shards = self.clip_config.num_shards(tensors[0].shape[0])
        if self._core_log is not None:
            labels = self.shard_labels(batch, num_shards)
            self._core_labels = None if labels is None or self._core_labels is None else self._core_labels + labels
        with self.training_ctx:
            loss = self._accumulate_cores(tensors, num_shards)
        if should_step:
            self._apply_step()
        self.on_fit_batch_end(batch, None, loss, should_step)
        return loss.detach().cpu()

    def _new_accumulator(self) -> CoreAccumulator:
        params = [p for _, p in trainable_parameters(self.modules)]
        cfg = self.clip_config
        return CoreAccumulator(params, cfg.method, cfg.clip_bound, cfg.reduction, cfg.allreduce_dtype)

    def _accumulate_cores(self, tensors, num_shards: int) -> torch.Tensor:
        """Per-core gradients of this micro-batch (``num_shards`` cores) into the accumulator; the mean loss.

        :func:`privasr.private_step.accumulate_cores` is the one loop/vmap dispatch (shared with
        :class:`~privasr.private_step.PerCoreClipping`); this adds the Brain's warning and hooks.
        """
        message = unequal_cores_message(tensors[0].shape[0], num_shards)
        if message and not self._warned_unequal_shards:
            self._warned_unequal_shards = True  # e.g. the last batch of an epoch without drop_last
            logger.warning(message)
        trim = self.trim_shard if getattr(self.hparams, "trim_shards", False) else None
        return accumulate_cores(self._accumulator, self.modules, self.shard_loss, tensors, num_shards,
                                self.clip_config.core_grad_mode, trim, self.shard_loss_reduction())

    def _apply_step(self) -> None:
        grads, stats = self._accumulator.reduce()
        self._accumulator = None
        self.last_stats = stats
        # Steps attempted so far, this one included: a skipped step does not advance optimizer_step.
        attempt = self.optimizer_step + self.counters.skipped_steps + 1
        if self._core_log is not None and self._core_labels and len(self._core_labels) == stats.num_cores:
            self._core_log.add(attempt, stats.core_norms.tolist(), stats.factors.tolist(), self._core_labels)
        self.counters.dropped_cores += len(stats.dropped)
        if stats.dropped:
            rank, world_size = world_info()
            logger.warning("step %d: dropped %d of %d core(s)%s with a NaN/Inf gradient (core index %s)",
                           attempt, len(stats.dropped), stats.num_cores,
                           f" of rank {rank}" if world_size > 1 else "", stats.dropped)
        if stats.skipped:
            self.counters.skipped_steps += 1
            logger.warning("step %d: every core was non-finite: optimizer step skipped (%d so far, patience %d)",
                           attempt, self.counters.skipped_steps, self.nonfinite_patience)
            self._check_nonfinite_patience()
        else:
            self._step_optimizers(grads)
            self._monitor_clipping(stats, grads)
        self._log_step(stats)

    def on_train_epoch_end(self, epoch) -> None:
        self._check_clipping_acted(epoch)

    # -- a bound that never clips -----------------------------------------------------------
    def _monitor_clipping(self, stats: AggregationStats, grads) -> None:
        if self._clip_monitor is None:
            return
        aggregate = None
        if self.clip_config.clipping == "global":
            aggregate = float(core_norm(grads)) / stats.global_factor  # the update's norm before global clipping
        self._clip_monitor.add(stats, aggregate)

    def _check_clipping_acted(self, epoch) -> None:
        """After the first epoch this process trains: warn (once) if the bound clipped nothing."""
        monitor, self._clip_monitor = self._clip_monitor, None
        if monitor is None:
            return
        clipped, norms = monitor.summary()  # collective: every rank takes part
        if clipped or norms.numel() == 0 or world_info()[0] != 0:
            return
        what = "aggregate gradient norms" if self.clip_config.clipping == "global" else "per-core gradient norms"
        logger.warning(
            "clip_bound=%g never clipped in epoch %s: the %d %s were %.4g..%.4g (median %.4g), so '%s' trained "
            "exactly like clipping 'none'; choose a bound below the norms, e.g. --clip_bound %.3g",
            self.clip_config.clip_bound, epoch, norms.numel(), what, float(norms.min()), float(norms.max()),
            float(norms.median()), self.clip_config.clipping, float(norms.median()))

    # -- logging ----------------------------------------------------------------------
    def _log_step(self, stats: AggregationStats) -> None:
        every = int(getattr(self.hparams, "log_every_n_steps", 0) or 0)
        if every <= 0 or self.optimizer_step % every != 0:
            return
        # collectives: every rank takes part, so that rank 0 logs the cores and counters of all ranks
        cores = gather_norms(torch.stack([stats.core_norms.float().cpu(), stats.factors.float().cpu()], dim=1))
        dropped_total = int(gather_norms(torch.tensor([self.counters.dropped_cores])).sum())
        rank, _ = world_info()
        writer = self._tensorboard()
        if rank != 0 or writer is None:
            return
        norms, factors = cores[:, 0], cores[:, 1]
        finite = norms[torch.isfinite(norms)]
        step = self.optimizer_step
        if finite.numel():
            writer.add_scalar("clipping/core_norm_min", float(finite.min()), step)
            writer.add_scalar("clipping/core_norm_median", float(finite.median()), step)
            writer.add_scalar("clipping/core_norm_max", float(finite.max()), step)
        if finite.numel():
            writer.add_scalar("clipping/clipped_fraction", clipped_fraction(norms, factors), step)
        if stats.global_factor < 1.0 or self.clip_config.clipping == "global":
            writer.add_scalar("clipping/global_factor", stats.global_factor, step)
        if stats.bound is not None:
            writer.add_scalar("clipping/bound", stats.bound, step)
        if self.update_max_norm is not None:
            writer.add_scalar("clipping/max_grad_norm_factor", self.last_update_factor, step)
        writer.add_scalar("clipping/dropped_cores_total", dropped_total, step)
        writer.add_scalar("clipping/skipped_steps_total", self.counters.skipped_steps, step)


#: The per-core Brain under the name recipes and checkpoints know.
PrivateBrain = PerCoreBrain
