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
