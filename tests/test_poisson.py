"""PoissonBatchSampler: batch-size law, rank sharding, determinism."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from privasr.dp.poisson import PoissonBatchSampler


def test_batch_sizes_have_mean_qN_and_binomial_variance():
    n, q = 2000, 0.02
    sampler = PoissonBatchSampler(n, q, seed=7)
    sizes = np.array([len(sampler.global_batch(step, epoch)) for epoch in range(20) for step in range(len(sampler))])
    assert len(sizes) == 20 * 50
    stderr = np.sqrt(n * q * (1 - q) / len(sizes))
    assert abs(sizes.mean() - n * q) < 4 * stderr
    assert sizes.var() == pytest.approx(n * q * (1 - q), rel=0.15)
    assert sampler.expected_batch_size == pytest.approx(40.0)


def test_each_example_is_included_with_probability_q():
    n, q, trials = 50, 0.1, 4000
    sampler = PoissonBatchSampler(n, q, seed=1, steps=trials)
    counts = np.zeros(n)
    for batch in sampler:
        counts[batch] += 1
    assert np.all(np.abs(counts / trials - q) < 5 * np.sqrt(q * (1 - q) / trials))


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shards_partition_the_global_batch(world_size):
    samplers = [PoissonBatchSampler(500, 0.05, seed=3, rank=r, world_size=world_size) for r in range(world_size)]
    for s in samplers:
        s.set_epoch(4)
    reference = PoissonBatchSampler(500, 0.05, seed=3)
    reference.set_epoch(4)
    for step, shards in enumerate(zip(*samplers)):
        merged = sorted(i for shard in shards for i in shard)
        assert merged == reference.global_batch(step)
        assert len(set(merged)) == len(merged)
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_deterministic_per_seed_epoch_step():
    a, b = PoissonBatchSampler(300, 0.1, seed=5), PoissonBatchSampler(300, 0.1, seed=5)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    assert list(PoissonBatchSampler(300, 0.1, seed=6)) != list(b)
    assert a.global_batch(3, epoch=0) == b.global_batch(3)


def test_empty_batches_are_allowed_and_steps_are_round_one_over_q():
    sampler = PoissonBatchSampler(5, 0.3, seed=0)
    assert len(sampler) == 3
    sizes = [len(sampler.global_batch(s, e)) for e in range(50) for s in range(3)]
    assert 0 in sizes  # P(empty) = 0.7**5 ~ 17%


def test_works_as_a_dataloader_batch_sampler():
    data = torch.arange(100.0)
    sampler = PoissonBatchSampler(len(data), 0.1, seed=2)
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=lambda xs: torch.tensor(xs))
    batches = list(loader)
    assert len(batches) == 10
    assert [b.long().tolist() for b in batches] == list(sampler)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_samples=0), "num_samples"), (dict(sample_rate=0.0), "sample_rate"),
    (dict(sample_rate=2.0), "sample_rate"), (dict(rank=2, world_size=2), "rank"),
    (dict(world_size=0), "world_size"), (dict(steps=0), "steps"),
])
def test_bad_arguments(kwargs, match):
    args = dict(num_samples=10, sample_rate=0.5) | kwargs
    with pytest.raises(ValueError, match=match):
        PoissonBatchSampler(**args)
