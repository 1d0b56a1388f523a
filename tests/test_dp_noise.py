"""The Gaussian mechanism: std sigma*C/(qN), added once per step on 1 and on 2 real processes."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from privasr.distributed import ordered_shutdown
from privasr.dp.noise import make_generator, noise_for_rank, normalize, privatize

SIGMA, C, Q, N = 1.3, 0.7, 0.05, 160  # expected batch q*N = 8
SHAPES = [(100, 60), (4000,), (5, 5, 40)]  # 11000 numbers: std estimated to ~0.7%


def zero_sums():
    return [torch.zeros(s) for s in SHAPES]


def pooled_std(tensors):
    return torch.cat([t.reshape(-1) for t in tensors if t is not None]).std().item()


def test_single_process_noise_std_is_sigma_C_over_expected_batch():
    out = privatize(zero_sums(), SIGMA, C, Q * N, generator=make_generator(0))
    assert pooled_std(out) == pytest.approx(SIGMA * C / (Q * N), rel=0.04)
    assert abs(torch.cat([t.reshape(-1) for t in out]).mean().item()) < 4 * SIGMA * C / (Q * N) / 11000 ** 0.5


def test_divides_by_expected_not_realised_batch():
    sums = [torch.full((4,), 12.0)]  # e.g. a realised batch of 3 examples
    assert torch.allclose(privatize(sums, 0.0, C, expected_batch_size=8.0)[0], torch.full((4,), 1.5))


def test_other_ranks_contribute_zeros():
    z = noise_for_rank(1, zero_sums(), SIGMA, C, make_generator(0))
    assert all(torch.count_nonzero(t) == 0 for t in z)
    assert pooled_std(noise_for_rank(0, zero_sums(), SIGMA, C, make_generator(0))) > 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(noise_multiplier=-1.0), "noise_multiplier"), (dict(max_norm=0.0), "max_norm"),
    (dict(expected_batch_size=0.0), "expected_batch_size"),
])
def test_bad_arguments(kwargs, match):
    args = dict(local_sums=zero_sums(), noise_multiplier=1.0, max_norm=1.0, expected_batch_size=4.0) | kwargs
    with pytest.raises(ValueError, match=match):
        privatize(**args)
    with pytest.raises(ValueError, match="expected_batch_size"):
        normalize(zero_sums(), -1)


def _ddp_worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    with ordered_shutdown():
        # every rank seeds its generator identically: only rank 0's may be used
        out = privatize(zero_sums(), SIGMA, C, Q * N, generator=make_generator(1234))
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_processes_add_the_noise_exactly_once(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for a, b in zip(*outs):
        assert torch.equal(a, b)  # every rank steps with the same gradient
    expected = SIGMA * C / (Q * N)
    assert pooled_std(outs[0]) == pytest.approx(expected, rel=0.04)  # sqrt(2) too big would be +41%
    single = privatize(zero_sums(), SIGMA, C, Q * N, generator=make_generator(1234))
    assert all(torch.equal(a, b) for a, b in zip(outs[0], single))  # the very same noise as on one process
