r"""Duration-bucketed random batches that keep what per-core clipping needs.

Random batches of utterances pad every example to the batch's longest one (about 30 %
of the frames computed on mini_tts are padding). :class:`DurationBucketSampler` orders
a dataset's indices so that consecutive global batches hold utterances of similar
duration, while keeping

* **equal cores**: every batch still has exactly ``batch_size`` examples per process
  (use ``drop_last``), so each core gets ``B = batch_size / virtual_cores`` examples;
* **random membership**: each epoch draws a fresh random permutation (seeded by
  ``(seed, epoch)``: bit-identical resume), cuts it into windows of ``bucket_batches``
  global batches, sorts each window by duration and cuts it into global batches; the
  order of the batches and the order of the examples inside each batch (hence which
  core an example lands on) are shuffled again. With ``bucket_batches = 1`` a batch is
  exactly a random batch (only its internal order changes); larger windows trade
  randomness of a batch's composition for less padding;
* **data parallelism**: a global batch is ``batch_size x world_size`` consecutive
  indices; SpeechBrain's ``DistributedSamplerWrapper`` hands rank ``r`` every
  ``world_size``-th index, so each process's batch comes from the same window.

Not for DP-SGD: its Poisson sampling (:mod:`privasr.dp.poisson`) is what the privacy
accounting assumes, and cannot be bucketed.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class DurationBucketSampler(Sampler[int]):
    """Indices of ``durations`` in duration-bucketed random global batches (see the module docstring)."""

    def __init__(self, durations: Sequence[float], batch_size: int, bucket_batches: int = 8, seed: int = 0,
                 world_size: int = 1):
        if batch_size < 1 or bucket_batches < 1 or world_size < 1:
            raise ValueError(f"batch_size, bucket_batches and world_size must be >= 1, got {batch_size}, "
                             f"{bucket_batches}, {world_size}")
        self.durations = torch.as_tensor(list(durations), dtype=torch.float64)
        self.global_batch = batch_size * world_size
        self.bucket_batches, self.seed, self.epoch = bucket_batches, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """SpeechBrain calls this at the start of every epoch: a new permutation, reproducibly."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.durations)

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.durations), generator=gen)
        window = self.global_batch * self.bucket_batches
        batches = []
        for start in range(0, len(order), window):
            chunk = order[start:start + window]
            # stable sort: equal durations keep their random order
            chunk = chunk[torch.sort(self.durations[chunk], stable=True).indices]
            batches += list(torch.split(chunk, self.global_batch))
        full = [b for b in batches if len(b) == self.global_batch]  # a short batch only at the end
        rest = [b for b in batches if len(b) < self.global_batch]
        shuffled = [full[i] for i in torch.randperm(len(full), generator=gen)] + rest
        for batch in shuffled:
            yield from batch[torch.randperm(len(batch), generator=gen)].tolist()
