r"""DP-SGD as a SpeechBrain ``Brain``: Poisson batches, per-example clipping, noise once per step.

One step :math:`t` (Abadi et al. 2016, with the per-layer clipping of the DP encoder paper)::

    B_t ⊂ [N], each example in with probability q        PoissonBatchSampler; rank r keeps B_t[r::W]
    g_i  = ∇_θ ℓ(θ; x_i)            for i ∈ B_t           privasr.per_sample (trained parameters only)
    ḡ_i  = clip(g_i)                                       privasr.dp.per_layer (flat | uniform | dim)
    (ghost: Σ_i ḡ_i from ghost norms, no g_i formed)       privasr.ghost + ghost_clipped_sum
    g̃_t  = (Σ_i ḡ_i + 𝒩(0, σ²C² I)) / (qN)                privasr.dp.noise.privatize
    θ   ← optimizer(θ, g̃_t);   ledger += (σ, q)            privasr.accounting.PrivacyLedger

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

:class:`DPSGDBrain` keeps :class:`privasr.brain.PrivateBrain`'s contract: a recipe defines
``batch_to_tensors(batch)`` and ``shard_loss(*tensors)`` (plus SpeechBrain's evaluation
methods), and its DP version is ``make_dp_brain(RecipeBrain)`` -- nothing else changes.

Before the private phase, :meth:`DPSGDBrain.public_warm_start` trains non-privately on a
public subset (paper §4.2.1) while accumulating the LayerFreeze scores
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
                           gradient (:func:`ghost_clipped_sum`; default ``loop``)
``layer_regex``            layer grouping for per-layer clipping and freezing
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

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import speechbrain as sb
import torch
from speechbrain.dataio.dataloader import SaveableDataLoader
from speechbrain.dataio.dataset import DynamicItemDataset
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.utils.checkpoints import Checkpointer, mark_as_loader, mark_as_saver, register_checkpoint_hooks
from torch.utils.data import DistributedSampler
from torch.utils.data.dataloader import default_collate
from tqdm import tqdm

from privasr.accounting import ACCOUNTANTS, PrivacyLedger
from privasr.brain import CORE_GRAD_MODES, PrivateBrain
from privasr.distributed import world_info
from privasr.dp.noise import all_reduce_sum, make_generator, privatize
from privasr.dp.memory import estimate, trace_layers
from privasr.dp.per_layer import CLIP_MODES, ClipResult, PerLayerClipper
from privasr.dp.poisson import PoissonBatchSampler
from privasr.freezing import LayerFreezer
from privasr.ghost import ghost_pass, summed_shard_loss
from privasr.per_sample import shard_grads_loop, shard_grads_vmap, trainable_parameters

logger = logging.getLogger(__name__)

#: Default layer grouping: each ``layers.<i>`` block, the conv front end, the final norm
#: and each head is one layer (anything else falls back to its top-level module).
LAYER_REGEX = r"^(.*?\blayers\.\d+|.*?\bsubsampling|.*?\bconformer\.norm|.*?\w*head)\."

#: Loader options that Poisson sampling replaces (ignored for the private training set).
_BATCHING_OPTIONS = ("batch_size", "shuffle", "drop_last", "sampler", "batch_sampler")


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


# -- small recoverable pieces --------------------------------------------------------------
@register_checkpoint_hooks
class NoiseSource:
    """The DP noise generator, checkpointed so that a resumed run re-draws exactly the noise
    of the steps it repeats (the same Poisson batches and the same noise: the same release).

    ``seed=None`` draws a secret seed from the OS (what a real private run must use).
    """

    def __init__(self, seed: Optional[int] = None):
        self.generator = make_generator(seed)

    @mark_as_saver
    def save(self, path) -> None:
        torch.save(self.generator.get_state(), path)

    @mark_as_loader
    def load(self, path, end_of_epoch: bool = False) -> None:
        self.generator.set_state(torch.load(path))


class EmptyBatch:
    """What the Poisson loader yields for a step whose local batch is empty (noise only)."""

    def __len__(self) -> int:
        return 0


class PoissonCollate:
    """Wraps a collate function so that an empty list of examples becomes an :class:`EmptyBatch`."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, examples):
        return EmptyBatch() if len(examples) == 0 else self.collate(examples)


def max_steps_within(ledger: PrivacyLedger, noise_multiplier: float, sample_rate: float,
                     target_epsilon: float, limit: int = 10**9) -> int:
    r"""The largest :math:`T` with :math:`\varepsilon(\text{history} + T \text{ steps}) \le \varepsilon^*`.

    Exponential search then bisection on :meth:`PrivacyLedger.epsilon_after` (ε grows with T).
    """
    fits = lambda t: ledger.epsilon_after(noise_multiplier, sample_rate, t) <= target_epsilon  # noqa: E731
    if not fits(0):
        return 0
    low, high = 0, 1
    while high < limit and fits(high):
        low, high = high, min(2 * high, limit)
    if high == limit and fits(high):
        return limit
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


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
    params = dict(trainable_parameters(module))
    summed: dict = {}
    for k, members in enumerate(clipper.groups.values()):
        group = dataclasses.replace(result, names=list(members))  # the same records, this group's parameters
        for name, total in zip(members, group.weighted_sum(factors[k], finite, [params[n].shape for n in members])):
            summed[name] = torch.zeros_like(params[name]) if total is None else total  # unused: zero gradient
    kept = int(finite.sum())
    return ClipResult([summed[n] for n in clipper.names], kept, int(finite.numel()) - kept, clipped), result.losses


# -- the Brain -----------------------------------------------------------------------------
class DPSGDBrain(PrivateBrain):
    """``PrivateBrain`` whose training step is DP-SGD (see the module docstring)."""

    def __init__(self, modules=None, opt_class=None, hparams=None, run_opts=None, checkpointer=None):
        # DP-SGD's core_grad_mode is DPConfig.grad_mode, used by this class's own fit_batch; the
        # per-core step's config (PerCoreBrain, unused here) refuses 'ghost' for a Brain with its own
        # fit_batch, so it is built with loop and the DP mode is restored on self.hparams after.
        hparams = dict(hparams or {})
        grad_mode = hparams.get("core_grad_mode", "loop")
        super().__init__(modules, opt_class, {**hparams, "core_grad_mode": "loop"}, run_opts, checkpointer)
        self.hparams.core_grad_mode = grad_mode
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
        self._clipper: Optional[PerLayerClipper] = None
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
        ignored = [k for k in _BATCHING_OPTIONS if loader_kwargs.pop(k, None) is not None]
        if ignored:
            logger.info("Poisson sampling replaces the loader options %s of the private training set", ignored)
        collate = loader_kwargs.pop("collate_fn", None) or (
            PaddedBatch if isinstance(dataset, DynamicItemDataset) else default_collate)
        loader_kwargs.setdefault("generator", torch.Generator().manual_seed(self.dp.sampling_seed))  # not the global RNG
        loader = SaveableDataLoader(dataset, batch_sampler=self.sampler, collate_fn=PoissonCollate(collate),
                                    **loader_kwargs)
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
        self._clipper = None
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
        sums, loss, stats = self._clipped_sum(batch)
        grads = privatize(sums, self.dp.noise_multiplier, self.dp.clip_bound,
                          self.sampler.expected_batch_size, self.noise.generator)
        self._step_optimizers(grads)
        self.ledger.step(self.dp.noise_multiplier, self.sample_rate)
        if self._budget is not None:
            self._budget -= 1
            if self._budget == 0:
                self._stop_at_target()
        self._log_dp_step(stats)
        self.on_fit_batch_end(batch, None, loss, True)
        return loss

    def clipper(self) -> PerLayerClipper:
        """The per-layer clipper of the *currently trained* parameters (rebuilt after freezing)."""
        if self._clipper is None:
            self._clipper = PerLayerClipper(self.modules.named_parameters(), self.dp.clip_bound,
                                            self.dp.clip_mode, self.dp.layer_regex)
        return self._clipper

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
        reduction = self.shard_loss_reduction()
        if reduction not in ("mean", "sum"):
            raise ValueError(
                f"core_grad_mode 'ghost' needs each example's loss from one forward of the batch, but "
                f"{type(self).__name__}.shard_loss is not a mean or sum of per-example losses "
                f"(shard_loss_reduction() = {reduction!r}): define {type(self).__name__}.example_losses(*tensors) "
                "-> [n] (each example's shard_loss alone), or use core_grad_mode loop or vmap")
        return summed_shard_loss(self.shard_loss, 1, reduction)

    def _clipped_sum(self, batch):
        r"""This rank's :math:`\sum_{i \in B_t^r} \bar g_i`, the mean loss and clipping statistics."""
        if isinstance(batch, EmptyBatch):
            zeros = [torch.zeros_like(p) for _, p in trainable_parameters(self.modules)]
            return zeros, torch.tensor(float("nan")), None
        tensors = self.batch_to_tensors(batch)
        ghost_loss = self._ghost_loss() if self.dp.grad_mode == "ghost" else None
        if not self._memory_logged:
            self._log_memory(tensors, ghost_loss)
        with self.training_ctx:
            sums, losses, results = clipped_example_sum(self.modules, self.shard_loss, tensors, self.clipper(),
                                                        self.dp.grad_mode, self.dp.micro_batch, ghost_loss)
        self.counters.dropped_cores += sum(r.num_dropped for r in results)
        finite = losses[torch.isfinite(losses)]
        loss = finite.mean() if finite.numel() else torch.tensor(float("nan"))
        return sums, loss.detach().cpu(), results

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

    def _params(self) -> List[torch.nn.Parameter]:
        return [p for _, p in trainable_parameters(self.modules)]

    # -- logging and results ---------------------------------------------------------------
    def _log_dp_step(self, results: Optional[List[ClipResult]]) -> None:
        every = int(getattr(self.hparams, "log_every_n_steps", 0) or 0)
        writer = self._tensorboard()
        if every <= 0 or self.optimizer_step % every or writer is None or not sb.utils.distributed.if_main_process():
            return
        kept = sum(r.num_kept for r in results) if results else 0
        writer.add_scalar("dp/local_batch_size", kept, self.optimizer_step)
        if kept:  # per layer: the fraction of this rank's examples that were clipped
            per_layer = torch.tensor([r.clipped_fraction for r in results], dtype=torch.float64)
            weights = torch.tensor([r.num_kept for r in results], dtype=torch.float64).unsqueeze(1)
            clipped = (per_layer * weights).sum(0) / kept
            writer.add_scalar("dp/clipped_fraction_mean_over_layers", float(clipped.mean()), self.optimizer_step)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        super().on_stage_end(stage, stage_loss, epoch)
        if stage == sb.Stage.TRAIN:
            self.report_privacy(epoch)

    def privacy_summary(self) -> dict:
        """Everything a reader needs to state the guarantee of this run (JSON-serialisable)."""
        trained = sum(p.numel() for _, p in trainable_parameters(self.modules))
        return {
            "epsilon": self.ledger.epsilon(), "delta": self.dp.delta, "accountant": self.dp.accountant,
            "steps": self.ledger.steps, "noise_multiplier": self.dp.noise_multiplier,
            "sample_rate": self.sample_rate, "expected_batch_size": self.sampler.expected_batch_size,
            "dataset_size": self.sampler.num_samples, "clip_bound": self.dp.clip_bound,
            "clip_mode": self.dp.clip_mode, "target_epsilon": self.dp.target_epsilon,
            "stopped_at_target": self.stopped_at_target, "history": self.ledger.history,
            "frozen_layers": list(self.freezer.frozen), "warm_start_steps": self.freezer.steps,
            "trained_parameters": trained, "total_parameters": sum(p.numel() for p in self.modules.parameters()),
        }

    def report_privacy(self, epoch=None) -> dict:
        """Log ε (file logger, TensorBoard, console) and write the JSON results; returns them."""
        summary = self.privacy_summary()
        if not sb.utils.distributed.if_main_process():
            return summary
        logger.info("epoch %s: epsilon = %.4g at delta = %g after %d DP steps", epoch, summary["epsilon"],
                    self.dp.delta, summary["steps"])
        train_logger = getattr(self.hparams, "train_logger", None)
        if train_logger is not None:
            train_logger.log_stats({"epoch": epoch, "dp_steps": summary["steps"]},
                                   train_stats={"epsilon": summary["epsilon"]})
        writer = self._tensorboard()
        if writer is not None and math.isfinite(summary["epsilon"]):
            writer.add_scalar("privacy/epsilon", summary["epsilon"], epoch or 0)
            writer.flush()
        path = self._output_path("privacy_file", "privacy.json")
        if path is not None:
            _write_json(path, summary)
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
        self._clipper = None
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
        self._wrap_distributed()  # the same starting point on every rank
        opt_class = getattr(self.hparams, "warm_start_opt_class", None) or self.opt_class
        optimizer = opt_class(self._params())
        loader = self._warm_start_loader(public_set, loader_kwargs)
        show = (not self.noprogressbar if progressbar is None else progressbar) and sb.utils.distributed.if_main_process()
        self.modules.train()
        for epoch in range(1, epochs + 1):
            if hasattr(getattr(loader, "sampler", None), "set_epoch"):
                loader.sampler.set_epoch(epoch)
            for batch in tqdm(loader, desc=f"public warm-start {epoch}/{epochs}", disable=not show,
                              dynamic_ncols=True):
                self._warm_start_step(batch, optimizer)
        logger.info("public warm-start: %d steps on %d public examples", self.freezer.steps, len(public_set))

    def _warm_start_loader(self, dataset, loader_kwargs: dict):
        """Ordinary batches; under several processes each rank reads its equal-length share."""
        kwargs, (rank, world) = dict(loader_kwargs), world_info()
        if world > 1:
            kwargs["sampler"] = DistributedSampler(dataset, num_replicas=world, rank=rank,
                                                   shuffle=kwargs.pop("shuffle", False), seed=self.dp.sampling_seed)
        return sb.dataio.dataloader.make_dataloader(dataset, **kwargs)

    def _warm_start_step(self, batch, optimizer) -> None:
        """One non-private step: mean-loss gradient averaged over processes, scores, update."""
        params = self._params()
        tensors = self.batch_to_tensors(batch)
        with self.training_ctx:
            loss = self.shard_loss(*tensors)
        grads = _dense(torch.autograd.grad(loss, params, allow_unused=True), params)
        _, world = world_info()
        for p, g in zip(params, all_reduce_sum(grads)):
            p.grad = g / world
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


def _write_json(path: str, data: dict) -> None:
    """Atomic JSON write (a reader never sees half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def make_dp_brain(base: type) -> type:
    """The DP-SGD version of a recipe's Brain: ``class DP<Base>(DPSGDBrain, Base)``.

    ``base`` must be a :class:`~privasr.brain.PrivateBrain` subclass (it provides
    ``batch_to_tensors``/``shard_loss`` and the evaluation); DPSGDBrain replaces its
    training step and training loader and adds accounting, warm-start and freezing.
    """
    if not (isinstance(base, type) and issubclass(base, PrivateBrain)):
        raise ValueError(f"make_dp_brain needs a PrivateBrain subclass, got {base!r}")
    if issubclass(base, DPSGDBrain):
        return base
    return type(f"DP{base.__name__}", (DPSGDBrain, base), {"__doc__": f"DP-SGD training of {base.__name__}."})
