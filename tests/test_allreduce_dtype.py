"""The cross-process sum in bfloat16 (allreduce_dtype): within bf16 rounding of the fp32 sum, flags and counts exact."""
import pytest
import torch

from privasr.brain import ClippingConfig
from privasr.distributed import CoreAccumulator
from privasr.per_sample import shard_grads_loop

from .ddp_utils import run_processes
from .toy import mse_loss_fn, toy_batch, toy_model


def update(rank, world_size, method, bound, dtype):
    model, (x, y) = toy_model(), toy_batch()
    per_process = x.shape[0] // world_size
    mine = (x[rank * per_process:(rank + 1) * per_process], y[rank * per_process:(rank + 1) * per_process])
    acc = CoreAccumulator(list(model.parameters()), method, bound, "mean", dtype)
    for grads, _ in shard_grads_loop(model, mse_loss_fn(model), mine, 2):
        acc.add_core(grads)
    grads, stats = acc.reduce()
    return torch.cat([g.flatten() for g in grads]), stats.num_cores


def _worker(rank, world_size, out_path):
    results = {(m, str(d)): update(rank, world_size, m, b, d) for m, b in (("pcc", 5.0), ("apcc", None))
               for d in (torch.float32, torch.bfloat16)}
    torch.save(results, f"{out_path}.{rank}")


def test_bfloat16_sum_is_the_float32_sum_to_bf16_precision(tmp_path):
    run_processes(_worker, 2, str(tmp_path / "u"))
    results = torch.load(f"{tmp_path / 'u'}.0")
    for method in ("pcc", "apcc"):
        exact, cores = results[(method, str(torch.float32))]
        narrow, cores_narrow = results[(method, str(torch.bfloat16))]
        assert cores == cores_narrow == 2  # this rank's cores; the kept count is summed exactly
        # rounded (not silently fp32), by about bf16's precision: each process's partial sum and the total are
        # rounded to 8 significant bits; an entry whose two partial sums nearly cancel can be far off relatively,
        # so the bound is on the whole update (2^-6: 3 roundings of at most 2^-9 each, with headroom)
        rel = (narrow - exact).norm() / exact.norm()
        assert 0 < rel <= 2 ** -6, float(rel)


def test_unknown_allreduce_dtype_is_refused():
    with pytest.raises(ValueError, match="unknown allreduce_dtype 'fp8'; accepted: float32, bfloat16"):
        ClippingConfig(allreduce_dtype="fp8")
