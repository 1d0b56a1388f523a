"""Real DDP (gloo, 2 processes x 2 virtual cores) = 1 process x 4 cores = the reference."""
import itertools

import pytest
import torch

from privasr.clipping import clip_and_aggregate
from privasr.distributed import CoreAccumulator
from privasr.per_sample import shard_grads_loop, shard_grads_vmap

from .ddp_utils import run_processes
from .toy import mse_loss_fn, toy_batch, toy_model

CONFIGS = [(m, b, r) for (m, b), r in itertools.product(
    [("none", None), ("global", 1.0), ("pcc", 5.0), ("apcc", None)], ["mean", "sum"])]
MODES = ("loop", "vmap")
CORES = 4


def local_update(rank, world_size, method, bound, reduction, mode):
    """The aggregated gradient as computed by one process owning CORES // world_size cores."""
    model = toy_model()
    x, y = toy_batch()
    per_process = x.shape[0] // world_size
    mine = (x[rank * per_process:(rank + 1) * per_process], y[rank * per_process:(rank + 1) * per_process])
    k = CORES // world_size
    acc = CoreAccumulator(list(model.parameters()), method, bound, reduction)
    if mode == "vmap":
        grads, _ = shard_grads_vmap(model, mse_loss_fn(model), mine, k)
        acc.add_cores(grads)
    else:
        for grads, _ in shard_grads_loop(model, mse_loss_fn(model), mine, k):
            acc.add_core(grads)
    grads, _ = acc.reduce()
    return torch.cat([g.flatten() for g in grads])


def reference_update(method, bound, reduction):
    model = toy_model()
    x, y = toy_batch()
    per_core = []
    for xs, ys in zip(x.chunk(CORES), y.chunk(CORES)):
        model.zero_grad()
        mse_loss_fn(model)(xs, ys).backward()
        per_core.append([p.grad.clone() for p in model.parameters()])
    return torch.cat([g.flatten() for g in clip_and_aggregate(per_core, method, bound, reduction)])


def _worker(rank, world_size, out_path):
    results = {(c, mode): local_update(rank, world_size, *c, mode) for c in CONFIGS for mode in MODES}
    torch.save(results, f"{out_path}.{rank}")


def test_bound_sits_between_the_core_norms():
    """Guard: the pcc bound used below clips some cores and not others, so the test means something."""
    model = toy_model()
    x, y = toy_batch()
    norms = []
    for xs, ys in zip(x.chunk(CORES), y.chunk(CORES)):
        model.zero_grad()
        mse_loss_fn(model)(xs, ys).backward()
        norms.append(float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm()))
    assert min(norms) < 5.0 < max(norms)
    assert float(reference_update("none", None, "mean").norm()) > 1.0  # and global clipping bites


def test_two_processes_one_process_and_reference_agree(tmp_path):
    out = str(tmp_path / "grads")
    run_processes(_worker, 2, out)
    per_rank = [torch.load(f"{out}.{r}") for r in range(2)]
    for config in CONFIGS:
        expected = reference_update(*config)
        for mode in MODES:
            single = local_update(0, 1, *config, mode)
            for got in (per_rank[0][(config, mode)], per_rank[1][(config, mode)], single):
                rel = (got - expected).norm() / expected.norm()
                assert rel <= 1e-5, (config, mode, float(rel))


# -- faulty cores under real processes: a zero core, a NaN core, a rank whose every core is NaN ------------
FAULTS = {"zero1_nan2": {1: "zero", 2: "nan"}, "rank1_all_nan": {2: "nan", 3: "nan"}}
FAULT_CONFIGS = [("none", None), ("global", 1.0), ("pcc", 5.0), ("apcc", None)]


def _poison(grads, kind):
    return [torch.zeros_like(g) if kind == "zero" else torch.full_like(g, float("nan")) for g in grads]


def faulty_core_grads(model, shards, first_core, faults):
    """Per-core gradients of ``shards`` (global core indices from ``first_core``), with ``faults`` applied."""
    out = []
    for j, (xs, ys) in enumerate(shards):
        model.zero_grad()
        mse_loss_fn(model)(xs, ys).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        kind = faults.get(first_core + j)
        out.append(_poison(grads, kind) if kind else grads)
    return out


def faulty_local_update(rank, world_size, method, bound, faults):
    model, (x, y) = toy_model(), toy_batch()
    k = CORES // world_size
    shards = list(zip(x.chunk(CORES), y.chunk(CORES)))[rank * k:(rank + 1) * k]
    acc = CoreAccumulator(list(model.parameters()), method, bound)
    for grads in faulty_core_grads(model, shards, rank * k, faults):
        acc.add_core(grads)
    grads, stats = acc.reduce()
    return torch.cat([g.flatten() for g in grads]), stats.dropped


def _faulty_worker(rank, world_size, out_path):
    results = {(name, m): faulty_local_update(rank, world_size, m, b, FAULTS[name])
               for name in FAULTS for m, b in FAULT_CONFIGS}
    torch.save(results, f"{out_path}.{rank}")


def test_faulty_cores_on_two_processes_match_the_reference(tmp_path):
    out = str(tmp_path / "faulty")
    run_processes(_faulty_worker, 2, out)
    per_rank = [torch.load(f"{out}.{r}") for r in range(2)]
    model, (x, y) = toy_model(), toy_batch()
    for name, faults in FAULTS.items():
        per_core = faulty_core_grads(model, list(zip(x.chunk(CORES), y.chunk(CORES))), 0, faults)
        for method, bound in FAULT_CONFIGS:
            expected = torch.cat([g.flatten() for g in clip_and_aggregate(per_core, method, bound)])
            assert torch.isfinite(expected).all()
            for rank in (0, 1):
                got, dropped = per_rank[rank][(name, method)]
                assert (got - expected).norm() <= 1e-5 * expected.norm(), (name, method, rank)
                # dropped cores are reported by the rank that owns them, as local indices
                assert dropped == [c - 2 * rank for c, kind in faults.items() if kind == "nan" and c // 2 == rank]


# -- add_clipped_sum: cores given by their norms and a weighted-sum function (ghost norms) -----------------
@pytest.mark.parametrize("method, bound", FAULT_CONFIGS)
def test_add_clipped_sum_equals_add_cores_with_zero_nan_and_unused_parameter(method, bound):
    """The same 4 cores (a zero one, a NaN one, the last parameter without a gradient), added in two
    micro-batches of 2 (apcc's local minimum runs over both): by add_cores and by add_clipped_sum."""
    model, (x, y) = toy_model(), toy_batch()
    per_core = faulty_core_grads(model, list(zip(x.chunk(CORES), y.chunk(CORES))), 0, {1: "zero", 2: "nan"})
    per_core = [grads[:-1] + [None] for grads in per_core]
    params = list(model.parameters())
    by_cores, by_sum = CoreAccumulator(params, method, bound), CoreAccumulator(params, method, bound)
    seen = []
    for cores in (per_core[:2], per_core[2:]):
        stacked = [None if cores[0][p] is None else torch.stack([c[p] for c in cores]) for p in range(len(params))]
        norms = by_cores.add_cores(stacked)

        def clipped_sum(factors, keep, cores=cores):
            seen.append((factors.clone(), keep.clone()))
            return [None if cores[0][p] is None else
                    sum(float(factors[k]) * cores[k][p] for k in range(len(cores)) if keep[k])
                    for p in range(len(params))]

        assert torch.allclose(by_sum.add_clipped_sum(norms, clipped_sum), norms, rtol=0, atol=0, equal_nan=True)
    assert [bool(k) for _, keep in seen for k in keep] == [True, True, False, True]
    assert all(float(f[~keep].abs().sum()) == 0 for f, keep in seen)  # a dropped core's factor is 0
    (expected, expected_stats), (got, stats) = by_cores.reduce(), by_sum.reduce()
    assert got[-1] is None and expected[-1] is None
    for g, e in zip(got[:-1], expected[:-1]):
        assert torch.allclose(g, e, rtol=1e-6, atol=1e-7), method
    assert torch.allclose(stats.core_norms, expected_stats.core_norms, rtol=0, atol=0, equal_nan=True)
    assert stats.dropped == expected_stats.dropped == [2]
    assert torch.allclose(stats.factors, expected_stats.factors) and stats.bound == expected_stats.bound


def test_add_clipped_sum_refuses_a_wrong_number_or_shape_of_gradients():
    params = list(toy_model().parameters())
    acc = CoreAccumulator(params, "pcc", 1.0)
    with pytest.raises(ValueError, match="returned 1 gradients for the accumulator's 4 parameters"):
        acc.add_clipped_sum(torch.ones(2), lambda f, keep: [torch.zeros(3)])
    with pytest.raises(ValueError, match=r"gradient 0 has 5 elements, its parameter \(8, 6\) has 48"):
        acc.add_clipped_sum(torch.ones(2), lambda f, keep: [torch.zeros(5)] + [None] * 3)
