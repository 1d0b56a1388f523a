r"""Poisson sampling of batches, identical on every process, then sharded across ranks.

DP-SGD's privacy amplification by subsampling assumes *Poisson* sampling: at every
step each of the :math:`N` examples enters the batch independently with probability
:math:`q`. The batch size :math:`|B_t| \sim \mathrm{Binomial}(N, q)` is random, with
mean :math:`qN`, and may be 0 (that step then only adds noise).

Drawing :math:`|B_t| \sim \mathrm{Binomial}(N, q)` and then a uniformly random subset of
that size gives exactly the same distribution as :math:`N` independent coin flips
(conditioned on its size, a Bernoulli subset is uniform), at a cost of
:math:`O(|B_t|)` instead of :math:`O(N)` per step.

Under DDP every rank draws the *global* batch from a generator seeded by
``(seed, epoch, step)``, so all ranks agree on it without communication; rank
:math:`r` of :math:`W` then keeps the positions :math:`r, r+W, r+2W, \dots` of the
sorted global batch. The shards partition the global batch and differ in size by at
most one. An epoch is :math:`\mathrm{round}(1/q)` steps.

Use it as a DataLoader ``batch_sampler``; do not wrap it in a DistributedSampler (it
already shards), and make the collate function accept empty batches: :func:`poisson_dataloader`
does both (an empty local batch becomes an :class:`EmptyBatch`).
"""
from __future__ import annotations

import logging
from typing import Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)

#: Loader options that Poisson sampling replaces (ignored for the private training set).
BATCHING_OPTIONS = ("batch_size", "shuffle", "drop_last", "sampler", "batch_sampler")


class PoissonBatchSampler(Sampler[List[int]]):
    r"""Batch sampler yielding this rank's share of a Poisson-sampled global batch.

    Args:
        num_samples: dataset size :math:`N \ge 1`.
        sample_rate: inclusion probability :math:`q \in (0, 1]`.
        seed: base seed shared by all ranks.
        rank: this process's rank :math:`r \in [0, W)`.
        world_size: number of processes :math:`W \ge 1`.
        steps: steps per epoch; default :math:`\mathrm{round}(1/q)`.

    Example:
        >>> sampler = PoissonBatchSampler(1000, sample_rate=0.01, seed=3)
        >>> len(sampler)
        100
        >>> sampler.set_epoch(1)
        >>> batches = list(sampler)
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        steps: Optional[int] = None,
    ):
        if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if int(world_size) != world_size or world_size < 1:
            raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
        if int(rank) != rank or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
        if seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.num_samples = int(num_samples)
        self.sample_rate = float(sample_rate)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.steps = max(1, round(1.0 / sample_rate)) if steps is None else int(steps)
        if self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1 or None, got {steps!r}")
        self.epoch = 0

    @property
    def expected_batch_size(self) -> float:
        """:math:`qN`, the mean global batch size (the DP-SGD normaliser)."""
        return self.sample_rate * self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches :meth:`__iter__` yields (as DistributedSampler)."""
        if int(epoch) != epoch or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    def global_batch(self, step: int, epoch: Optional[int] = None) -> List[int]:
        """The sorted indices of the whole (all-rank) batch of ``step`` in ``epoch``."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, int(epoch), int(step)])
        size = int(rng.binomial(self.num_samples, self.sample_rate))
        chosen = rng.choice(self.num_samples, size=size, replace=False)
        return sorted(int(i) for i in chosen)

    def shard(self, batch: List[int]) -> List[int]:
        """This rank's positions ``rank::world_size`` of a global batch."""
        return batch[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[List[int]]:
        for step in range(self.steps):
            yield self.shard(self.global_batch(step))

    def __len__(self) -> int:
        return self.steps


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


def poisson_dataloader(dataset, sampler: PoissonBatchSampler, seed: int, **loader_kwargs):
    """A checkpointable DataLoader over ``dataset`` whose batches are ``sampler``'s (this rank's share).

    The batching options of ``loader_kwargs`` (:data:`BATCHING_OPTIONS`) are dropped, with one
    log line: Poisson sampling replaces them. ``collate_fn`` defaults to SpeechBrain's
    ``PaddedBatch`` for a ``DynamicItemDataset`` (torch's ``default_collate`` otherwise) and is
    wrapped in :class:`PoissonCollate`; the workers' base seed comes from a generator seeded with
    ``seed``, not from the global RNG (which a resume restores).
    """
    from speechbrain.dataio.batch import PaddedBatch
    from speechbrain.dataio.dataloader import SaveableDataLoader
    from speechbrain.dataio.dataset import DynamicItemDataset
    from torch.utils.data.dataloader import default_collate

    ignored = [k for k in BATCHING_OPTIONS if loader_kwargs.pop(k, None) is not None]
    if ignored:
        logger.info("Poisson sampling replaces the loader options %s of the private training set", ignored)
    collate = loader_kwargs.pop("collate_fn", None) or (
        PaddedBatch if isinstance(dataset, DynamicItemDataset) else default_collate)
    loader_kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
    return SaveableDataLoader(dataset, batch_sampler=sampler, collate_fn=PoissonCollate(collate), **loader_kwargs)
