"""PrivateBrain's training step = an SGD step on the reference aggregate (1 and 2 processes)."""
import os
import subprocess
import sys

import pytest
import torch

from privasr.clipping import clip_and_aggregate

from .ddp_utils import free_port
from .toy import fit_toy_brain, make_toy_brain, mse_loss_fn, toy_batch, toy_model

LR = 0.1
CASES = [("none", None), ("global", 1.0), ("pcc", 5.0), ("apcc", None), ("pec", 3.0)]


def reference_run(method, bound, cores_per_step, steps=2, reduction="mean"):
    """Plain SGD on clip_and_aggregate of the per-core gradients, step by step.

    Returns the final parameters and, per step, the norm of each core's gradient.
    """
    model = toy_model()
    x, y = toy_batch(n=8 * steps)
    norms = []
    for s in range(steps):
        xs, ys = x[8 * s: 8 * s + 8], y[8 * s: 8 * s + 8]
        per_core = []
        for cx, cy in zip(xs.chunk(cores_per_step), ys.chunk(cores_per_step)):
            model.zero_grad()
            mse_loss_fn(model)(cx, cy).backward()
            per_core.append([p.grad.clone() for p in model.parameters()])
        norms.append([float(torch.sqrt(sum((g ** 2).sum() for g in grads))) for grads in per_core])
        agg = clip_and_aggregate(per_core, "pcc" if method == "pec" else method, bound, reduction)
        with torch.no_grad():
            for p, g in zip(model.parameters(), agg):
                p -= LR * g
    return torch.cat([p.detach().flatten() for p in model.parameters()]), norms


def reference_params(method, bound, cores_per_step, steps=2, reduction="mean"):
    """The final parameters of :func:`reference_run`."""
    return reference_run(method, bound, cores_per_step, steps, reduction)[0]


def batches_of(size, steps=2):
    x, y = toy_batch(n=8 * steps)
    return [(x[i: i + size], y[i: i + size]) for i in range(0, 8 * steps, size)]


def hparams(method, bound, virtual_cores, mode="loop", **extra):
    return dict(clipping=method, clip_bound=bound, virtual_cores=virtual_cores, core_grad_mode=mode, **extra)


@pytest.mark.parametrize("method, bound", CASES)
@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_one_process_four_virtual_cores(method, bound, mode, tmp_path):
    brain = make_toy_brain(hparams(method, bound, 4, mode), lr=LR)
    got = fit_toy_brain(brain, batches_of(8))
    cores = 8 if method == "pec" else 4
    expected = reference_params(method, bound, cores)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, bound", [("pcc", 5.0), ("apcc", None)])
def test_gradient_accumulation_makes_each_micro_batch_shard_a_core(method, bound):
    accumulated = make_toy_brain(hparams(method, bound, 2), lr=LR, run_opts={"grad_accumulation_factor": 2})
    got = fit_toy_brain(accumulated, batches_of(4))
    assert torch.allclose(got, reference_params(method, bound, 4), rtol=1e-5, atol=1e-6)


def test_all_cores_nan_skips_the_step_and_counts_it():
    brain = make_toy_brain(hparams("apcc", None, 2), lr=LR)
    x, y = toy_batch()
    x[0, 0] = x[4, 0] = float("nan")  # one NaN in each core
    before = torch.cat([p.detach().flatten().clone() for p in brain.modules.parameters()])
    after = fit_toy_brain(brain, [(x, y)])
    assert torch.equal(before, after)
    assert brain.counters.skipped_steps == 1 and brain.counters.dropped_cores == 2


def test_tensorboard_gets_clipping_statistics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    brain = make_toy_brain(hparams("pcc", 5.0, 4, log_every_n_steps=1, tensorboard_dir=str(tmp_path)), lr=LR)
    fit_toy_brain(brain, batches_of(8))
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"clipping/core_norm_min", "clipping/core_norm_median", "clipping/core_norm_max",
            "clipping/clipped_fraction", "clipping/bound", "clipping/dropped_cores_total"} <= tags
    assert [e.value for e in events.Scalars("clipping/bound")] == [5.0, 5.0]
    # the fraction of cores whose norm exceeds 5.0, recomputed by hand along the same SGD trajectory
    _, norms = reference_run("pcc", 5.0, 4)
    expected = [sum(n > 5.0 for n in step) / 4 for step in norms]
    assert [e.value for e in events.Scalars("clipping/clipped_fraction")] == pytest.approx(expected)


def test_bad_clipping_config_is_refused():
    with pytest.raises(ValueError, match="accepted: none, global, pcc, apcc, pec"):
        make_toy_brain(hparams("per-core", None, 2))
    with pytest.raises(ValueError, match="needs a clipping bound"):
        make_toy_brain(hparams("pcc", None, 2))


SCRIPT = os.path.join(os.path.dirname(__file__), "brain_ddp_script.py")


def test_torchrun_two_processes_two_virtual_cores_each(tmp_path):
    """Real torchrun, gloo: 2 processes x 2 virtual cores = 1 process x 4 = the reference."""
    out = tmp_path / "params.pt"
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(SCRIPT))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), SCRIPT, str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(out)
    for method, bound in CASES:
        cores = 8 if method == "pec" else 4
        expected = reference_params(method, bound, cores)
        for rank in range(2):
            assert torch.allclose(got[(rank, method)], expected, rtol=1e-5, atol=1e-6), (rank, method)


@pytest.mark.parametrize("method, bound", [("global", 1.0), ("pcc", 5.0)])
def test_two_optimizer_param_groups_are_clipped_as_one_gradient(method, bound):
    """SpeechBrain's own clipping sees only param_groups[0]; privasr's norm covers every group."""
    def two_groups(params):
        params = list(params)
        return torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=LR)

    brain = make_toy_brain(hparams(method, bound, 4), lr=LR)
    brain.opt_class = two_groups
    got = fit_toy_brain(brain, batches_of(8))
    assert len(brain.optimizer.param_groups) == 2
    assert torch.allclose(got, reference_params(method, bound, 4), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, bound", [("pec", 20.0), ("pcc", 15.0), ("apcc", None)])
def test_ghost_core_grads_equal_vmap_and_the_reference(method, bound):
    """core_grad_mode ghost (no per-core gradients) trains like vmap: pec (one example per core) and
    pcc/apcc with 4 cores of B = 2 examples each; the logged loss is the mean of the cores' losses too."""
    brains = {mode: make_toy_brain(hparams(method, bound, 4, mode), lr=LR) for mode in ("ghost", "vmap")}
    got = {mode: fit_toy_brain(brain, batches_of(8)) for mode, brain in brains.items()}
    assert torch.allclose(got["ghost"], got["vmap"], rtol=1e-5, atol=1e-6)
    assert torch.allclose(got["ghost"], reference_params(method, bound, 8 if method == "pec" else 4),
                          rtol=1e-5, atol=1e-6)
    assert brains["ghost"].avg_train_loss == pytest.approx(brains["vmap"].avg_train_loss, rel=1e-6)
    stats = {mode: brain.last_stats for mode, brain in brains.items()}
    assert torch.allclose(stats["ghost"].core_norms, stats["vmap"].core_norms, rtol=1e-5)
    if method != "apcc":  # the bound clips some cores and not others, so the comparison means something
        assert 0 < stats["ghost"].clipped_fraction < 1


def test_ghost_is_refused_by_a_brain_with_its_own_training_step():
    from privasr.brain import PrivateBrain

    class OwnStep(PrivateBrain):  # like DPSGDBrain: fit_batch replaced, the per-core step unused
        def fit_batch(self, batch):
            raise AssertionError("not reached")

    with pytest.raises(ValueError, match="'ghost' is implemented by PrivateBrain's per-core step; OwnStep trains"):
        OwnStep(modules={"model": toy_model()}, opt_class=lambda p: torch.optim.SGD(p, lr=LR),
                hparams=hparams("pec", 3.0, 1, "ghost"), run_opts={"device": "cpu"})
