r"""DP-SGD as a SpeechBrain ``Brain``: Poisson batches, per-example clipping, noise once per step.

One step :math:`t` (Abadi et al. 2016, with the per-layer clipping of the DP encoder paper)::

    B_t ⊂ [N], each example in with probability q        PoissonBatchSampler; rank r keeps B_t[r::W]
    g_i  = ∇_θ ℓ(θ; x_i)            for i ∈ B_t           privasr.per_sample (trained parameters only)
    ḡ_i  = clip(g_i)                                       privasr.dp.per_layer (flat | uniform | dim)
    (ghost: Σ_i ḡ_i from ghost norms, no g_i formed)       privasr.ghost + privasr.dp.step.ghost_clipped_sum
    g̃_t  = (Σ_i ḡ_i + 𝒩(0, σ²C² I)) / (qN)                privasr.dp.noise.privatize
    ledger += (σ, q)                                       privasr.accounting.PrivacyLedger
    θ   ← optimizer(θ, g̃_t)

The middle lines are one object, :class:`privasr.dp.step.DPSGDStep` (also what
``privasr-bench-dp`` times); this module adds the Brain around it: the Poisson loader
(:mod:`privasr.dp.poisson`), the ε budget (:func:`privasr.accounting.max_steps_within`), the
reports (:mod:`privasr.dp.report`), the public warm-start and the layer freezing.

Flat clipping bounds :math:`\|\bar g_i\|_2 \le C`; per-layer clipping bounds every layer
:math:`k` by :math:`C_k` with :math:`\sum_k C_k^2 = C^2` (``uniform``: :math:`C/\sqrt K`,
``dim``: :math:`C\sqrt{D_k/D}`), so the sensitivity of the sum is :math:`C` either way and
the noise stays :math:`\sigma C`. The sum over examples *and processes* is one SUM
all-reduce; rank 0 alone adds the noise, so it is added once per step, and the result
is divided by the *expected* batch size :math:`qN` (never the realised one). A step whose
Poisson batch is empty on every rank still adds noise and still counts.

Frozen layers (``requires_grad=False``, see :class:`privasr.freezing.LayerFreezer`) get no
gradient, no clipping budget and no noise: :math:`C_k`, the noise and the accountant only
ever see the trained parameters.

:class:`DPSGDBrain` is a sibling of :class:`privasr.brain.PerCoreBrain` over the shared
infrastructure :class:`privasr.brain.PrivasrBrain` (no DDP wrapper, atomic checkpoints, RNG
state, counters) and keeps the recipe contract: a recipe defines ``batch_to_tensors(batch)`` and
``shard_loss(*tensors)`` (plus SpeechBrain's evaluation methods) in a class over
``PrivasrBrain`` with no training step, and its DP version is ``make_dp_brain(Recipe)`` (its
per-core version ``class Brain(Recipe, PerCoreBrain)``) -- nothing else changes.

Before the private phase, :meth:`DPSGDBrain.public_warm_start` trains non-privately on a
public subset (paper §4.2.1; an ordinary data-parallel step,
:class:`privasr.private_step.PerCoreClipping` with ``method="none"``) while accumulating the LayerFreeze scores
:math:`s_l = \frac{1}{D_l}\sum_t\|\nabla_{\theta_l}\mathcal L_t\|^2` (§4.2.3), then freezes
the lowest-scoring layers.

Hyper-parameters (all in the recipe's YAML):

=========================  =========================================================
``noise_multiplier``       :math:`\sigma \ge 0` (required)
``clip_bound``             :math:`C > 0` (required)
``dp_batch_size``          expected *global* batch :math:`qN`; :math:`q` = this / N (required)
``delta``                  the δ at which ε is reported (required)
``dp_clip_mode``           ``flat`` | ``uniform`` | ``dim`` (default ``flat``)
``accountant``             ``rdp`` | ``prv`` (default ``rdp``)
``target_epsilon``         stop before ε would exceed it (default: none)
``noise_seed``             ``null`` = secret seed from the OS (default); an int for tests
``sampling_seed``          Poisson sampling seed, shared by all ranks (default: ``seed``)
``dp_micro_batch``         examples per vmap call or ghost pass (memory bound; default 8)
``core_grad_mode``         ``loop`` | ``vmap`` per-example gradients, or ``ghost``: per-example
                           (per-layer) norms and the clipped sum with no per-example
                           gradient (:func:`privasr.dp.step.ghost_clipped_sum`; default ``loop``)
``layer_regex``            layer grouping for per-layer clipping and freezing (default
                           :data:`privasr.dp.per_layer.LAYER_REGEX`)
``privacy_file``           JSON results (default ``<output_folder>/privacy.json``)
``warm_start_epochs``      epochs over the public set (warm-start; default 0)
``warm_start_opt_class``   optimizer of the warm-start (default ``opt_class``)
``warm_start_folder``      where the finished warm-start is saved (resume)
``freeze_fraction`` /      freeze this fraction / this many of the lowest-score layers
``freeze_count``           (at most one; both ``null``: no freezing)
``freeze_exclude``         layers that always stay trained (e.g. the head)
``freeze_file``            JSON of the scores and frozen layers (default ``<output_folder>/freeze.json``)
=========================  =========================================================
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import List, Optional

import speechbrain as sb
import torch
from speechbrain.utils.checkpoints import Checkpointer
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from privasr.accounting import ACCOUNTANTS, PrivacyLedger, max_steps_within
from privasr.brain import PerCoreBrain, PrivasrBrain
from privasr.distributed import world_info
from privasr.dp.memory import estimate, trace_layers
from privasr.dp.noise import NoiseSource
from privasr.dp.per_layer import CLIP_MODES, LAYER_REGEX, PerLayerClipper
from privasr.dp.poisson import EmptyBatch, PoissonBatchSampler, poisson_dataloader
from privasr.dp.report import privacy_summary, report_privacy
from privasr.dp.step import DPSGDStep, DPStepStats
from privasr.freezing import LayerFreezer
from privasr.ghost import summed_shard_loss
from privasr.per_sample import trainable_parameters
from privasr.private_step import CORE_GRAD_MODES, PerCoreClipping

logger = logging.getLogger(__name__)


# -- configuration -----------------------------------------------------------------------
def _required(hparams, name: str):
    value = getattr(hparams, name, None)
    if value is None:
        raise ValueError(f"DP-SGD needs the hyper-parameter {name!r} in the YAML (or --{name} on the command line)")
    return value


def _first_set(*values):
    return next(v for v in values if v is not None)


@dataclass(frozen=True)
class DPConfig:
    """The validated DP-SGD settings of a run (see the module table)."""

    noise_multiplier: float
    clip_bound: float
    batch_size: float
    delta: float
    clip_mode: str = "flat"
    accountant: str = "rdp"
    target_epsilon: Optional[float] = None
    noise_seed: Optional[int] = None
    sampling_seed: int = 0
    micro_batch: int = 8
    grad_mode: str = "loop"
    layer_regex: str = LAYER_REGEX

    def __post_init__(self):
        checks = [
            (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier), "noise_multiplier must be >= 0"),
            (self.clip_bound > 0 and math.isfinite(self.clip_bound), "clip_bound must be a finite number > 0"),
            (self.batch_size > 0, "dp_batch_size (expected global batch q*N) must be > 0"),
            (0 < self.delta < 1, "delta must be in (0, 1)"),
            (self.clip_mode in CLIP_MODES, f"dp_clip_mode must be one of {', '.join(CLIP_MODES)}"),
            (self.accountant in ACCOUNTANTS, f"accountant must be one of {', '.join(ACCOUNTANTS)}"),
            (self.target_epsilon is None or self.target_epsilon > 0, "target_epsilon must be > 0 or null"),
            (self.micro_batch >= 1, "dp_micro_batch must be >= 1"),
            (self.grad_mode in CORE_GRAD_MODES, f"core_grad_mode must be one of {', '.join(CORE_GRAD_MODES)}"),
            (self.sampling_seed >= 0, "sampling_seed must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}; got {self}")

    @classmethod
    def from_hparams(cls, hparams) -> "DPConfig":
        get = lambda name, default: getattr(hparams, name, default)  # noqa: E731
        target = get("target_epsilon", None)
        seed = get("noise_seed", None)
        return cls(
            noise_multiplier=float(_required(hparams, "noise_multiplier")),
            clip_bound=float(_required(hparams, "clip_bound")),
            batch_size=float(_required(hparams, "dp_batch_size")),
            delta=float(_required(hparams, "delta")),
            clip_mode=get("dp_clip_mode", "flat"),
            accountant=get("accountant", "rdp"),
            target_epsilon=None if target is None else float(target),
            noise_seed=None if seed is None else int(seed),
            sampling_seed=int(_first_set(get("sampling_seed", None), get("seed", None), 0)),
            micro_batch=int(get("dp_micro_batch", 8)),
            grad_mode=get("core_grad_mode", "loop"),
            layer_regex=get("layer_regex", None) or LAYER_REGEX,
        )


# -- the Brain -----------------------------------------------------------------------------
class DPSGDBrain(PrivasrBrain):
    """A privasr Brain whose training step is DP-SGD (see the module docstring)."""

    def __init__(self, modules=None, opt_class=None, hparams=None, run_opts=None, checkpointer=None):
        super().__init__(modules, opt_class, hparams, run_opts, checkpointer)
        self.dp = DPConfig.from_hparams(self.hparams)
        if self.dp.grad_mode == "ghost":
            self._ghost_loss()  # refused now, not at the first step, when the recipe cannot say its per-example losses
        if self.grad_accumulation_factor != 1:
            raise ValueError("DP-SGD takes one Poisson batch per step: set grad_accumulation_factor to 1 "
                             f"(got {self.grad_accumulation_factor}); dp_micro_batch bounds the memory instead")
        self.ledger = PrivacyLedger(self.dp.delta, self.dp.accountant, self.dp.target_epsilon)
        self.noise = NoiseSource(self.dp.noise_seed)
        if self.dp.noise_seed is not None:
            logger.warning("noise_seed=%d: the DP noise is reproducible -- for tests and debugging only; "
                           "a private run needs noise_seed: null", self.dp.noise_seed)
        self.freezer = LayerFreezer(self.modules, self.dp.layer_regex)
        self.sampler: Optional[PoissonBatchSampler] = None
        self._dp_step: Optional[DPSGDStep] = None  # rebuilt when the trained parameters change (freezing)
        self._budget: Optional[int] = None
        self._memory_logged = False
        self.stopped_at_target = False
        if self.checkpointer is not None:
            self.checkpointer.add_recoverable("privacy_ledger", self.ledger)
            self.checkpointer.add_recoverable("noise_generator", self.noise)
            self.checkpointer.add_recoverable("layer_freezer", self.freezer)

    # -- sampling ------------------------------------------------------------------------
    @property
    def sample_rate(self) -> float:
        r""":math:`q = \text{dp\_batch\_size} / N` of the private training set."""
        if self.sampler is None:
            raise RuntimeError("no private training set yet: the sample rate is known once fit() made its loader")
        return self.sampler.sample_rate

    def make_dataloader(self, dataset, stage, ckpt_prefix="dataloader-", **loader_kwargs):
        """Poisson batches for ``Stage.TRAIN`` (the private set); SpeechBrain's loaders otherwise."""
        if stage != sb.Stage.TRAIN:
            return super().make_dataloader(dataset, stage, ckpt_prefix, **loader_kwargs)
        num = len(dataset)
        if num < 1:
            raise ValueError("the private training set is empty")
        if self.dp.batch_size > num:
            raise ValueError(f"dp_batch_size ({self.dp.batch_size:g}) exceeds the {num} private training examples")
        rank, world = world_info()
        self.sampler = PoissonBatchSampler(num, self.dp.batch_size / num, self.dp.sampling_seed, rank, world)
        self.train_sampler = self.sampler  # SpeechBrain calls set_epoch(epoch) on it
        self._dp_step = None  # its q and qN are the sampler's
        loader = poisson_dataloader(dataset, self.sampler, self.dp.sampling_seed, **loader_kwargs)
        if self.checkpointer is not None and ckpt_prefix is not None:
            self.checkpointer.add_recoverable(ckpt_prefix + stage.name, loader)
        return loader

    # -- start of fit: recover, re-freeze, budget ----------------------------------------
    def on_fit_start(self):
        super().on_fit_start()  # broadcast parameters, optimizers, recover the latest checkpoint
        if self.sampler is None:
            raise ValueError("DP-SGD needs Poisson sampling: pass the training *dataset* to fit(), "
                             "not a DataLoader, so that DPSGDBrain makes its Poisson loader")
        if self.freezer.frozen:
            self.freezer.apply(self.modules)
        self._dp_step = None
        self._budget = self._remaining_budget()
        if self._budget == 0:
            self._stop_at_target()
        self._log_setup()

    def _remaining_budget(self) -> Optional[int]:
        """DP steps left before ε would exceed ``target_epsilon`` (None: no target)."""
        if self.dp.target_epsilon is None:
            return None
        return max_steps_within(self.ledger, self.dp.noise_multiplier, self.sample_rate, self.dp.target_epsilon)

    def _stop_at_target(self) -> None:
        """End training before the step that would exceed the target ε (SpeechBrain's step limit)."""
        self.stopped_at_target = True
        self.optimizer_step_limit = self.optimizer_step
        logger.info("target epsilon %.4g reached after %d DP steps (epsilon = %.4g): stopping",
                    self.dp.target_epsilon, self.ledger.steps, self.ledger.epsilon())

    def _log_setup(self) -> None:
        trained = sum(p.numel() for _, p in trainable_parameters(self.modules))
        total = sum(p.numel() for p in self.modules.parameters())
        logger.info("DP-SGD: sigma=%g C=%g (%s) q=%.5g (expected batch %.4g of N=%d), delta=%g, "
                    "%d steps/epoch, %d/%d parameters trained; so far %d steps, epsilon=%.4g%s",
                    self.dp.noise_multiplier, self.dp.clip_bound, self.dp.clip_mode, self.sample_rate,
                    self.sampler.expected_batch_size, self.sampler.num_samples, self.dp.delta, len(self.sampler),
                    trained, total, self.ledger.steps, self.ledger.epsilon(),
                    "" if self._budget is None else f"; {self._budget} steps left before the target")

    # -- the DP-SGD step -----------------------------------------------------------------
    def fit_batch(self, batch):
        if self._budget is not None and self._budget <= 0:  # never exceed the target ε
            self._stop_at_target()
            return torch.tensor(float("nan"))
        self.on_fit_batch_start(batch, True)
        step = self.dp_step()
        if not isinstance(batch, EmptyBatch):  # an empty local batch adds nothing but still takes the noise
            tensors = self.batch_to_tensors(batch)
            ghost_loss = self._ghost_loss() if self.dp.grad_mode == "ghost" else None
            if not self._memory_logged:
                self._log_memory(tensors, ghost_loss)
            with self.training_ctx:
                step.backward(self.shard_loss, *tensors, ghost_loss_fn=ghost_loss)
        grads, stats = step.noisy_mean()  # the noise once across processes; the ledger counts the step
        self.counters.dropped_cores += stats.num_dropped
        loss = stats.loss
        self._step_optimizers(grads)
        if self._budget is not None:
            self._budget -= 1
            if self._budget == 0:
                self._stop_at_target()
        self._log_dp_step(stats)
        self.on_fit_batch_end(batch, None, loss, True)
        return loss

    def dp_step(self) -> DPSGDStep:
        """The DP-SGD step of the *currently trained* parameters (rebuilt after freezing), counted in the ledger."""
        if self._dp_step is None:
            clipper = PerLayerClipper(self.modules.named_parameters(), self.dp.clip_bound, self.dp.clip_mode,
                                      self.dp.layer_regex)
            self._dp_step = DPSGDStep(self.modules, clipper, self.dp.noise_multiplier,
                                      self.sampler.expected_batch_size, self.noise, self.dp.grad_mode,
                                      self.dp.micro_batch, self.ledger, self.sample_rate)
        return self._dp_step

    def clipper(self) -> PerLayerClipper:
        """The per-layer clipper of the *currently trained* parameters (rebuilt after freezing)."""
        return self.dp_step().clipper

    def _ghost_loss(self):
        """The loss ghost differentiates: per-example losses, or the sum of the examples' shard losses.

        A wrong one would clip the wrong per-example gradients, so the sensitivity (and the
        guarantee) would not hold: a recipe that declares neither is refused, naming both hooks.

        The optional hook ``example_losses(*tensors) -> [n]``, found anywhere in the recipe's classes:
        each example's loss from ONE forward of the batch, entry ``i`` equal to ``shard_loss`` of example
        ``i`` alone (what loop and vmap differentiate), e.g. BEST-RQ's ``loss(..., reduction="per_example")``.
        Without it, ghost uses ``shard_loss`` of the whole batch when :meth:`shard_loss_reduction` declares
        it a mean (or sum) of per-example losses.
        """
        example_losses = getattr(self, "example_losses", None)
        if example_losses is not None:
            return example_losses
        reduction = self.shard_loss_reduction()  # the recipe's optional hook (PrivasrBrain's default: "mean")
        if reduction not in ("mean", "sum"):
            raise ValueError(
                f"core_grad_mode 'ghost' needs each example's loss from one forward of the batch, but "
                f"{type(self).__name__}.shard_loss is not a mean or sum of per-example losses "
                f"(shard_loss_reduction() = {reduction!r}): define {type(self).__name__}.example_losses(*tensors) "
                "-> [n] (each example's shard_loss alone), or use core_grad_mode loop or vmap")
        return summed_shard_loss(self.shard_loss, 1, reduction)

    def _log_memory(self, tensors, ghost_loss) -> None:
        """One line at the first non-empty batch: per-example gradients vs ghost's records (:mod:`privasr.dp.memory`).

        Logged here, not in on_fit_start: ghost's memory grows with the positions :math:`L` (and
        :math:`L^2`) of every layer, which only a batch knows. The shapes come from one forward of
        the first chunk without gradients, outside the RNG streams of training (forked).
        """
        self._memory_logged = True
        chunk = [t[:self.dp.micro_batch] for t in tensors]
        loss_fn = ghost_loss or self.shard_loss
        cuda = [torch.device(self.device).index or 0] if torch.device(self.device).type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=cuda):
                layers = trace_layers(self.modules, lambda: loss_fn(*chunk), chunk[0].shape[0])
            _, world = world_info()
            est = estimate(layers, self.modules, self.sampler.expected_batch_size / world, self.dp.micro_batch)
        except (RuntimeError, ValueError, IndexError, TypeError) as err:  # a log line must not stop training
            logger.warning("DP-SGD memory estimate skipped (%s: %s)", type(err).__name__, err)
            return
        logger.info("DP-SGD (%s), %d examples padded to %s: %s", self.dp.grad_mode, tensors[0].shape[0],
                    tuple(tensors[0].shape[1:]), est.line())

    # -- logging and results ---------------------------------------------------------------
    def _log_dp_step(self, stats: DPStepStats) -> None:
        every = int(getattr(self.hparams, "log_every_n_steps", 0) or 0)
        writer = self._tensorboard()
        if every <= 0 or self.optimizer_step % every or writer is None or not sb.utils.distributed.if_main_process():
            return
        writer.add_scalar("dp/local_batch_size", stats.num_kept, self.optimizer_step)
        clipped = stats.clipped_fraction  # per layer: the fraction of this rank's examples that were clipped
        if clipped is not None:
            writer.add_scalar("dp/clipped_fraction_mean_over_layers", float(clipped.mean()), self.optimizer_step)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        super().on_stage_end(stage, stage_loss, epoch)
        if stage == sb.Stage.TRAIN:
            self.report_privacy(epoch)

    def privacy_summary(self) -> dict:
        """Everything a reader needs to state the guarantee of this run (:func:`privasr.dp.report.privacy_summary`)."""
        return privacy_summary(self.ledger, self.dp, self.sampler, self.modules, self.freezer, self.stopped_at_target)

    def report_privacy(self, epoch=None) -> dict:
        """Log ε (file logger, TensorBoard, console) and write the JSON results; returns them."""
        summary = self.privacy_summary()
        if sb.utils.distributed.if_main_process():
            report_privacy(summary, epoch, self._output_path("privacy_file", "privacy.json"),
                           getattr(self.hparams, "train_logger", None), self._tensorboard())
        return summary

    def _output_path(self, key: str, default_name: str) -> Optional[str]:
        path = getattr(self.hparams, key, None)
        folder = getattr(self.hparams, "output_folder", None)
        if path is None and folder is not None:
            path = os.path.join(folder, default_name)
        return path

    # -- public warm-start and layer freezing ----------------------------------------------
    def public_warm_start(self, public_set, loader_kwargs: Optional[dict] = None,
                          progressbar: Optional[bool] = None) -> List[str]:
        r"""Non-private training on public data, LayerFreeze scores, then freezing.

        Runs ``warm_start_epochs`` epochs of ordinary (non-private, averaged across
        processes) training on ``public_set``, accumulating
        :math:`s_l = \frac{1}{D_l}\sum_t\|\nabla_{\theta_l}\mathcal L_t\|^2` after every step;
        then freezes the ``freeze_fraction`` (or ``freeze_count``) lowest-score layers,
        prints the table and writes ``freeze_file``. The finished phase is saved in
        ``warm_start_folder``, so a re-run skips it and restores the same model and layers.

        Returns:
            the names of the frozen layers.
        """
        store = self._warm_start_store()
        if store is not None and store.find_checkpoint() is not None:
            store.recover_if_possible()
            logger.info("public warm-start already done (%d steps): restored from %s",
                        self.freezer.steps, store.checkpoints_dir)
        else:
            self._run_warm_start(public_set, loader_kwargs or {}, progressbar)
            self._select_frozen_layers()
            if store is not None:
                store.save_checkpoint(meta={"warm_start_steps": self.freezer.steps}, verbosity=logging.DEBUG)
        self.freezer.apply(self.modules)
        self._dp_step = None
        self._announce_freezing()
        return list(self.freezer.frozen)

    def _warm_start_store(self) -> Optional[Checkpointer]:
        folder = getattr(self.hparams, "warm_start_folder", None)
        if folder is None:
            return None
        return Checkpointer(folder, recoverables={"modules": self.modules, "layer_freezer": self.freezer})

    def _run_warm_start(self, public_set, loader_kwargs: dict, progressbar: Optional[bool]) -> None:
        epochs = int(getattr(self.hparams, "warm_start_epochs", 0) or 0)
        if epochs <= 0 or public_set is None or len(public_set) == 0:
            logger.info("no public warm-start (warm_start_epochs=%d, %d public examples)", epochs,
                        0 if public_set is None else len(public_set))
            return
        # an ordinary data-parallel step: the mean gradient over the processes (no clipping, no noise);
        # PerCoreClipping broadcasts rank 0's parameters first (the same starting point on every rank)
        step = PerCoreClipping(self.modules, "none")
        opt_class = getattr(self.hparams, "warm_start_opt_class", None) or self.opt_class
        optimizer = opt_class(step.params)
        loader = self._warm_start_loader(public_set, loader_kwargs)
        show = (not self.noprogressbar if progressbar is None else progressbar) and sb.utils.distributed.if_main_process()
        self.modules.train()
        for epoch in range(1, epochs + 1):
            if hasattr(getattr(loader, "sampler", None), "set_epoch"):
                loader.sampler.set_epoch(epoch)
            for batch in tqdm(loader, desc=f"public warm-start {epoch}/{epochs}", disable=not show,
                              dynamic_ncols=True):
                self._warm_start_step(batch, step, optimizer)
        logger.info("public warm-start: %d steps on %d public examples", self.freezer.steps, len(public_set))

    def _warm_start_loader(self, dataset, loader_kwargs: dict):
        """Ordinary batches; under several processes each rank reads its equal-length share."""
        kwargs, (rank, world) = dict(loader_kwargs), world_info()
        if world > 1:
            kwargs["sampler"] = DistributedSampler(dataset, num_replicas=world, rank=rank,
                                                   shuffle=kwargs.pop("shuffle", False), seed=self.dp.sampling_seed)
        return sb.dataio.dataloader.make_dataloader(dataset, **kwargs)

    def _warm_start_step(self, batch, step: PerCoreClipping, optimizer) -> None:
        """One non-private step: the mean-loss gradient averaged over processes, LayerFreeze scores, update."""
        tensors = self.batch_to_tensors(batch)
        with self.training_ctx:
            step.backward(self.shard_loss, *tensors)
        if step.reduce().skipped:  # a NaN/Inf gradient on every process: no update, no score (logged)
            return
        for p in step.params:  # a parameter the loss does not use: a zero gradient, as before PerCoreClipping
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.freezer.accumulate(self.modules)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def _select_frozen_layers(self) -> None:
        fraction = getattr(self.hparams, "freeze_fraction", None)
        count = getattr(self.hparams, "freeze_count", None)
        if fraction is None and count is None:
            return
        if self.freezer.steps == 0:
            raise ValueError("layer freezing needs public warm-start steps: set warm_start_epochs > 0 and a "
                             "non-empty public set, or freeze_fraction and freeze_count to null")
        self.freezer.select(fraction=fraction, count=count, exclude=getattr(self.hparams, "freeze_exclude", None) or ())

    def _announce_freezing(self) -> None:
        if not sb.utils.distributed.if_main_process() or self.freezer.steps == 0:
            return
        print(f"LayerFreeze (scores from {self.freezer.steps} public warm-start steps):\n{self.freezer.summary()}",
              flush=True)
        path = self._output_path("freeze_file", "freeze.json")
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.freezer.save(path)


def make_dp_brain(recipe: type, name: Optional[str] = None) -> type:
    """The DP-SGD Brain of a recipe: ``class DP<Recipe>(DPSGDBrain, recipe)`` (or ``name``).

    ``recipe`` is the recipe part of a Brain: a :class:`~privasr.brain.PrivasrBrain` subclass
    that defines ``batch_to_tensors``/``shard_loss`` and the evaluation but no training step
    (e.g. :class:`privasr.ssl.brain.BestRQRecipe`); DPSGDBrain adds its training step, training
    loader, accounting, warm-start and freezing. A :class:`~privasr.brain.PerCoreBrain` is
    refused: its per-core step and state would come along, unused, and its checks would judge
    DP-SGD's settings (e.g. refuse ``core_grad_mode: ghost``, which DP-SGD implements itself).
    """
    if not (isinstance(recipe, type) and issubclass(recipe, PrivasrBrain)):
        raise ValueError(f"make_dp_brain needs a recipe class over PrivasrBrain (batch_to_tensors, shard_loss, "
                         f"evaluation; e.g. privasr.ssl.brain.BestRQRecipe), got {recipe!r}")
    if issubclass(recipe, DPSGDBrain):
        return recipe
    if issubclass(recipe, PerCoreBrain):
        raise ValueError(f"make_dp_brain needs the recipe without a training step, but {recipe.__name__} is a "
                         f"PerCoreBrain (the per-core step): move its recipe methods into a class over "
                         f"PrivasrBrain, e.g. {recipe.__name__}Recipe, and build both Brains from it: "
                         f"class {recipe.__name__}({recipe.__name__}Recipe, PerCoreBrain) and "
                         f"make_dp_brain({recipe.__name__}Recipe) (as privasr.ssl.brain does for BEST-RQ)")
    name = name or f"DP{recipe.__name__}"
    # __module__: the recipe's, so that the class is found (pickle, logs) where the recipe lives
    return type(name, (DPSGDBrain, recipe), {"__doc__": f"DP-SGD training of {recipe.__name__}.",
                                             "__module__": recipe.__module__})
