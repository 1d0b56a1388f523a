"""PerCoreClipping (privasr.private_step) = the reference privasr.clipping.aggregate, in one process and in two."""
import contextlib
import io
import itertools
import runpy
from pathlib import Path

import pytest
import torch

from privasr.clipping import aggregate
from privasr.private_step import PerCoreClipping

from .ddp_utils import run_processes
from .toy import mse_loss_fn, toy_batch, toy_model

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plain_pytorch_pcc.py"
# bounds between the per-core (pcc: 4 cores of 2) and per-example (pec) norms of the toy batch, as in
# test_ddp_equivalence / test_brain, so that clipping bites on some cores and not on others
CASES = [("none", None), ("global", 1.0), ("pcc", 5.0), ("apcc", None), ("pec", 3.0)]
CONFIGS = [(m, b, r, mode) for (m, b), r, mode in itertools.product(CASES, ["mean", "sum"], ["loop", "vmap", "ghost"])]
CORES = 4


def flat(tensors):
    return torch.cat([t.flatten() for t in tensors])


def reference(method, bound, reduction, x, y, cores):
    """Each core's gradient by a plain backward, then the reference aggregation: (update, stats)."""
    model, per_core = toy_model(), []
    for xs, ys in zip(x.chunk(cores), y.chunk(cores)):
        model.zero_grad()
        mse_loss_fn(model)(xs, ys).backward()
        per_core.append([p.grad.clone() for p in model.parameters()])
    return aggregate(per_core, "pcc" if method == "pec" else method, bound, reduction)


def private_update(method, bound, reduction, mode, micro_batches, virtual_cores):
    """p.grad after PerCoreClipping.backward on each micro-batch, then reduce(): (update, stats, losses)."""
    model = toy_model()
    clip = PerCoreClipping(model, method, bound, virtual_cores, reduction, mode)
    losses = [clip.backward(mse_loss_fn(model), x, y) for x, y in micro_batches]
    stats = clip.reduce()
    return flat(p.grad for p in model.parameters()), stats, losses


def assert_close(got, expected, what):
    rel = float((got - expected).norm() / expected.norm())
    assert rel <= 1e-5, (what, rel)  # the tolerance of test_ddp_equivalence


@pytest.mark.parametrize("method,bound,reduction,mode", CONFIGS)
def test_one_process_emulating_cores_equals_the_reference(method, bound, reduction, mode):
    x, y = toy_batch()
    cores = x.shape[0] if method == "pec" else CORES
    expected, ref_stats = reference(method, bound, reduction, x, y, cores)
    got, stats, (loss,) = private_update(method, bound, reduction, mode, [(x, y)], CORES)
    assert_close(got, flat(expected), (method, reduction, mode))
    assert torch.allclose(stats.core_norms, ref_stats.core_norms, rtol=1e-6)
    assert torch.allclose(stats.factors, ref_stats.factors, rtol=1e-6)
    assert stats.bound == pytest.approx(ref_stats.bound) and not stats.skipped and stats.dropped == []
    if method in ("pcc", "pec"):  # the guard: the bound clips some cores, not all
        assert 0 < stats.clipped_fraction < 1
    model = toy_model()
    shard_losses = [mse_loss_fn(model)(xs, ys) for xs, ys in zip(x.chunk(cores), y.chunk(cores))]
    assert float(loss) == pytest.approx(float(torch.stack(shard_losses).mean().detach()), rel=1e-6)


@pytest.mark.parametrize("method,bound", CASES)
def test_gradient_accumulation_adds_cores(method, bound):
    """Two backward() calls of 2 cores each = one step of 4 cores (apcc: b_t is the min over both calls)."""
    x, y = toy_batch()
    expected, ref_stats = reference(method, bound, "mean", x, y, x.shape[0] if method == "pec" else CORES)
    got, stats, _ = private_update(method, bound, "mean", "loop", [(x[:4], y[:4]), (x[4:], y[4:])], 2)
    assert_close(got, flat(expected), method)
    assert stats.bound == pytest.approx(ref_stats.bound) and stats.num_cores == ref_stats.num_cores


@pytest.mark.parametrize("mode", ["loop", "vmap", "ghost"])
def test_a_nan_core_is_dropped_and_an_all_nan_step_is_skipped(mode):
    x, y = toy_batch()
    x = x.clone()
    x[4:6] = float("nan")  # core 2 of 4
    expected, _ = reference("pcc", 5.0, "mean", x, y, CORES)
    got, stats, _ = private_update("pcc", 5.0, "mean", mode, [(x, y)], CORES)
    assert stats.dropped == [2] and not stats.skipped and torch.isfinite(got).all()
    assert_close(got, flat(expected), "nan core")

    model = toy_model()
    for p in model.parameters():
        p.grad = torch.ones_like(p)  # a stale gradient must not survive a skipped step
    clip = PerCoreClipping(model, "apcc", core_grad_mode=mode, virtual_cores=CORES)
    clip.backward(mse_loss_fn(model), torch.full_like(x, float("nan")), y)
    stats = clip.reduce()
    assert stats.skipped and stats.dropped == [0, 1, 2, 3] and stats.bound is None
    assert all(p.grad is None for p in model.parameters())


def test_a_step_starts_afresh_after_reduce():
    """The second step's update is its own cores' only (nothing left over from the first)."""
    x, y = toy_batch()
    model = toy_model()
    clip = PerCoreClipping(model, "pcc", 5.0, virtual_cores=2)
    clip.backward(mse_loss_fn(model), x[4:], y[4:])
    clip.reduce()
    clip.backward(mse_loss_fn(model), x[:4], y[:4])
    assert clip.reduce().num_cores == 2
    expected, _ = reference("pcc", 5.0, "mean", x[:4], y[:4], 2)
    assert_close(flat(p.grad for p in model.parameters()), flat(expected), "second step")


def test_ghost_with_a_summed_shard_loss_equals_the_loop():
    """loss_reduction='sum' (a shard loss summing its examples' losses): ghost scales the batch loss as it must."""
    from privasr.distributed import CoreAccumulator
    from privasr.private_step import accumulate_cores

    x, y = toy_batch()
    results = {}
    for mode in ("loop", "ghost"):
        model = toy_model()
        acc = CoreAccumulator(list(model.parameters()), "pcc", 5.0)
        loss = accumulate_cores(acc, model, lambda xs, ys: ((model(xs) - ys) ** 2).sum(), (x, y), CORES, mode,
                                loss_reduction="sum")
        grads, stats = acc.reduce()
        results[mode] = flat(grads), stats, float(loss)
    (expected, ref_stats, ref_loss), (got, stats, loss) = results["loop"], results["ghost"]
    assert_close(got, expected, "sum")
    assert torch.allclose(stats.core_norms, ref_stats.core_norms, rtol=1e-6) and 0 < stats.clipped_fraction < 1
    assert loss == pytest.approx(ref_loss, rel=1e-6)


def test_ghost_refuses_a_loss_that_is_not_per_example():
    from privasr.distributed import CoreAccumulator
    from privasr.private_step import accumulate_cores

    model, (x, y) = toy_model(), toy_batch()
    acc = CoreAccumulator(list(model.parameters()), "pcc", 5.0)
    with pytest.raises(ValueError, match="core_grad_mode 'ghost' .* got None; use core_grad_mode loop or vmap"):
        accumulate_cores(acc, model, mse_loss_fn(model), (x, y), CORES, "ghost", loss_reduction=None)
    with pytest.raises(ValueError, match="unknown loss_reduction 'frames'"):
        PerCoreClipping(model, "pcc", 5.0, core_grad_mode="ghost", loss_reduction="frames")


# -- bad input: one clear error each ------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(method="dpsgd"), ValueError, "unknown clipping method 'dpsgd'; accepted: none, global, pcc, apcc, pec"),
    (dict(method="pcc"), ValueError, "'pcc' needs a clipping bound"),
    (dict(method="pec"), ValueError, "'pcc' needs a clipping bound"),
    (dict(method="global", bound=-1.0), ValueError, "positive finite float, got -1.0"),
    (dict(method="pcc", bound=1.0, reduction="max"), ValueError, "unknown reduction 'max'"),
    (dict(method="pcc", bound=1.0, virtual_cores=0), ValueError,
     r"virtual_cores must be an integer >= 1 \(cores each process emulates\), got 0"),
    (dict(method="pcc", bound=1.0, core_grad_mode="jit"), ValueError, "unknown core_grad_mode 'jit'"),
    (dict(method="pcc", bound=1.0, allreduce_dtype="float16"), ValueError, "unknown allreduce_dtype 'float16'"),
])
def test_bad_settings_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        PerCoreClipping(toy_model(), **kwargs)


def test_bad_calls_are_refused():
    model = toy_model()
    with pytest.raises(TypeError, match="needs the torch.nn.Module being trained"):
        PerCoreClipping(list(model.parameters()), "none")
    # DataParallel works without GPUs, DistributedDataParallel needs a process group: the same check refuses both
    with pytest.raises(ValueError, match="needs the bare model, not a DistributedDataParallel/DataParallel wrapper"):
        PerCoreClipping(torch.nn.DataParallel(model), "none")
    clip = PerCoreClipping(model, "pcc", 1.0, virtual_cores=4)
    with pytest.raises(RuntimeError, match=r"reduce\(\) called without backward\(\)"):
        clip.reduce()
    x, y = toy_batch(n=3)
    with pytest.raises(ValueError, match="a batch of 3 examples cannot feed virtual_cores=4 cores"):
        clip.backward(mse_loss_fn(model), x, y)
    with pytest.raises(ValueError, match="same number of examples along dim 0"):
        clip.backward(mse_loss_fn(model), x, y[:2])
    with pytest.raises(ValueError, match="got no batch tensors"):
        clip.backward(mse_loss_fn(model))
    x, y = toy_batch()
    with pytest.raises(ValueError, match=r"scalar mean loss of its shard, got \(2,\)"):
        clip.backward(lambda xs, ys: ((model(xs) - ys) ** 2).sum(1), x, y)
    clip = PerCoreClipping(model, "pcc", 1.0, virtual_cores=4)
    clip.backward(mse_loss_fn(model), x, y)
    clip.reduce()
    with pytest.raises(RuntimeError, match="without backward"):  # one reduce per step
        clip.reduce()


# -- two real gloo processes x 2 virtual cores = 1 process x 4 cores = the reference ---------------------------
# Loop mode, and ghost for the clipping methods (its cores enter the reduce through add_clipped_sum): the
# cross-process reduce does not depend otherwise on how the cores were computed (vmap = loop is tested above),
# and a process's first vmap call imports torch._dynamo (3-6 s per process on 2 cores).
TWO_PROCESS_CONFIGS = [config for config in CONFIGS if config[3] == "loop" or (
    config[3] == "ghost" and config[0] in ("pcc", "apcc", "pec") and config[2] == "mean")]


def _worker(rank, world_size, out_path):
    x, y = toy_batch()
    half = slice(rank * 4, rank * 4 + 4)
    mine = (x[half], y[half])
    results = {config: private_update(*config, [mine], CORES // world_size)[0] for config in TWO_PROCESS_CONFIGS}
    results["accumulation"] = private_update("apcc", None, "mean", "loop", [(mine[0][:2], mine[1][:2]),
                                                                             (mine[0][2:], mine[1][2:])], 1)[0]
    torch.manual_seed(rank)  # every rank its own initialisation: the constructor broadcasts rank 0's
    model = torch.nn.Linear(3, 2)
    PerCoreClipping(model, "none")
    results["broadcast"] = flat(model.parameters()).detach()
    results["example"] = flat(runpy.run_path(str(EXAMPLE))["main"](steps=3).parameters()).detach()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # the script as torchrun runs it (here on the group already made)
        runpy.run_path(str(EXAMPLE), run_name="__main__")
    results["example_stdout"] = out.getvalue()
    torch.save(results, f"{out_path}.{rank}")


def test_two_processes_equal_one_process_and_the_reference_and_the_example_runs(tmp_path):
    out = str(tmp_path / "grads")
    run_processes(_worker, 2, out)
    per_rank = [torch.load(f"{out}.{r}") for r in range(2)]
    x, y = toy_batch()
    for method, bound, reduction, mode in TWO_PROCESS_CONFIGS:
        expected = flat(reference(method, bound, reduction, x, y, x.shape[0] if method == "pec" else CORES)[0])
        for rank in (0, 1):
            assert_close(per_rank[rank][(method, bound, reduction, mode)], expected, (method, reduction, mode, rank))
    expected = flat(reference("apcc", None, "mean", x, y, CORES)[0])  # 2 processes x 1 core x 2 micro-batches
    for rank in (0, 1):
        assert_close(per_rank[rank]["accumulation"], expected, ("accumulation", rank))
    torch.manual_seed(0)
    assert torch.equal(per_rank[1]["broadcast"], flat(torch.nn.Linear(3, 2).parameters()).detach())
    assert torch.equal(per_rank[0]["example"], per_rank[1]["example"])  # one update on every process
    lines = per_rank[0]["example_stdout"].splitlines()
    assert len(lines) == 10 and lines[0].startswith("step 0: loss ") and per_rank[1]["example_stdout"] == ""
    losses = [float(line.split("loss ")[1].split(",")[0]) for line in lines]
    assert losses[-1] < losses[0]


def test_the_example_runs_in_one_process(capsys):
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10 and all("cores clipped" in line for line in lines)
