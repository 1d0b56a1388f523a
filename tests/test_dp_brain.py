"""DPSGDBrain: the noise actually added, the clipped mean, freezing, accounting, budget and resume."""
import json
import math

import pytest
import speechbrain as sb
import torch

from privasr.accounting import epsilon
from privasr.brain import PrivasrBrain
from privasr.dp.brain import DPSGDBrain, make_dp_brain
from privasr.dp.poisson import EmptyBatch
from privasr.dp.per_layer import layer_bounds

from .ddp_utils import run_processes
from .toy import make_toy_brain

SIGMA, C, DELTA = 1.3, 0.7, 1e-5
N, BATCH = 40, 4.0  # q = 0.1: 10 Poisson steps per epoch, some of them with an empty local batch on 2 ranks


class ToyDPBrain(DPSGDBrain):
    """DP-SGD on ``model`` with the squared error of one linear/MLP model (or a zero-gradient loss)."""

    def batch_to_tensors(self, batch):
        return tuple(t.to(self.device) for t in batch)

    def shard_loss(self, x, y):
        out = self.modules.model(x)
        if getattr(self.hparams, "zero_gradient", False):
            return (out * 0.0).sum()
        return ((out - y) ** 2).sum(dim=1).mean()


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def dataset(n=N, d_in=6, d_out=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = torch.randn(n, d_out, generator=g) * torch.linspace(0.1, 4.0, n).unsqueeze(1)  # varied norms
    return [(x[i], y[i]) for i in range(n)]


def hparams(tmp_path=None, **overrides):
    base = dict(noise_multiplier=SIGMA, clip_bound=C, dp_batch_size=BATCH, delta=DELTA, noise_seed=123,
                sampling_seed=7, dp_clip_mode="flat", core_grad_mode="loop")
    if tmp_path is not None:
        base["output_folder"] = str(tmp_path)
    return base | overrides


def make_brain(hp, model=None, lr=1.0, checkpointer=None, run_opts=None):
    model = model if model is not None else mlp()
    return ToyDPBrain(modules={"model": model}, opt_class=lambda p: torch.optim.SGD(p, lr=lr), hparams=hp,
                      run_opts={"device": "cpu", **(run_opts or {})}, checkpointer=checkpointer)


def flat_params(brain):
    return torch.cat([p.detach().flatten() for p in brain.modules.parameters()])


def fit(brain, data, epochs=1):
    brain.fit(sb.utils.epoch_loop.EpochCounter(epochs), train_set=data, progressbar=False)
    return flat_params(brain)


# -- the noise actually added ---------------------------------------------------------------
def noise_run(rank=0, world_size=1, out=None):
    """A zero-gradient model of 10,100 weights; SGD lr=1: theta_T - theta_0 = -(sum of T noise draws)/(qN)."""
    torch.manual_seed(0)
    brain = make_brain(hparams(zero_gradient=True), model=torch.nn.Linear(100, 100))
    before = flat_params(brain)
    after = fit(brain, dataset(d_in=100, d_out=100))
    steps = brain.ledger.steps
    if out is not None:
        torch.save({"delta": after - before, "steps": steps}, f"{out}/rank{rank}.pt")
    return after - before, steps


def expected_noise_std(steps):
    return SIGMA * C / BATCH * math.sqrt(steps)


def test_noise_std_is_sigma_C_over_expected_batch_on_one_process():
    delta, steps = noise_run()
    assert steps == 10
    assert delta.std().item() == pytest.approx(expected_noise_std(steps), rel=0.04)
    assert abs(delta.mean().item()) < 4 * expected_noise_std(steps) / math.sqrt(delta.numel())


def _noise_worker(rank, world_size, out):
    noise_run(rank, world_size, out)


def test_noise_std_on_two_real_processes_is_added_once(tmp_path):
    run_processes(_noise_worker, 2, str(tmp_path))
    runs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(runs[0]["delta"], runs[1]["delta"])  # both ranks take the same step
    assert runs[0]["steps"] == 10
    # sqrt(2) too large (noise on both ranks) would be +41%; the same noise twice +100%
    assert runs[0]["delta"].std().item() == pytest.approx(expected_noise_std(10), rel=0.04)
    single, _ = noise_run()
    assert torch.allclose(runs[0]["delta"], single, atol=1e-6)  # the very noise of one process


# -- sigma = 0: the update is the per-example clipped sum over qN ----------------------------
def reference_params(mode, brain_sampler, epochs=1, regex=r"^(model\.\d+)\."):
    """SGD (lr=1) on (1/qN) sum_i clip(g_i) over the same Poisson batches, one example at a time."""
    model = mlp()
    data = dataset()
    named = [(f"model.{n}", p) for n, p in model.named_parameters()]
    groups = [0, 0, 0, 0] if mode == "flat" else [0, 0, 1, 1]
    sizes = [sum(p.numel() for (n, p), k in zip(named, groups) if k == g) for g in sorted(set(groups))]
    bounds = layer_bounds(C, sizes, mode)
    for epoch in range(1, epochs + 1):
        for step in range(len(brain_sampler)):
            total = [torch.zeros_like(p) for _, p in named]
            for i in brain_sampler.global_batch(step, epoch):
                x, y = data[i]
                loss = ((model(x[None]) - y[None]) ** 2).sum(dim=1).mean()
                grads = torch.autograd.grad(loss, [p for _, p in named])
                norms = [math.sqrt(sum(float(g.pow(2).sum()) for g, k in zip(grads, groups) if k == grp))
                         for grp in range(len(bounds))]
                for t, g, k in zip(total, grads, groups):
                    t += g * (min(1.0, bounds[k] / norms[k]) if norms[k] > 0 else 1.0)
            with torch.no_grad():
                for (_, p), t in zip(named, total):
                    p -= t / BATCH
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("mode", ["flat", "uniform", "dim"])
@pytest.mark.parametrize("grad_mode", ["loop", "vmap"])
def test_sigma_zero_update_is_the_clipped_sum_over_expected_batch(mode, grad_mode):
    brain = make_brain(hparams(noise_multiplier=0.0, dp_clip_mode=mode, core_grad_mode=grad_mode,
                               dp_micro_batch=3, layer_regex=r"^(model\.\d+)\."))
    got = fit(brain, dataset(), epochs=2)
    assert len(brain.clipper().bounds) == (1 if mode == "flat" else 2)
    assert torch.allclose(got, reference_params(mode, brain.sampler, epochs=2), rtol=1e-5, atol=1e-6)


def test_empty_poisson_batches_still_step_and_count():
    brain = make_brain(hparams(dp_batch_size=0.5))  # q = 1/80: most of the 80 steps are empty
    fit(brain, dataset())
    empty = sum(not brain.sampler.global_batch(s, 1) for s in range(len(brain.sampler)))
    assert empty > 40 and brain.ledger.steps == len(brain.sampler) == 80
    assert len(EmptyBatch()) == 0


# -- freezing ----------------------------------------------------------------------------
def test_frozen_layers_stay_bit_identical_through_training(tmp_path):
    hp = hparams(tmp_path, warm_start_epochs=2, freeze_count=1, layer_regex=r"^(model\.\d+)\.",
                 dp_clip_mode="dim")
    brain = make_brain(hp, lr=0.1)
    frozen = brain.public_warm_start(dataset(n=8, seed=5), {"batch_size": 4}, progressbar=False)
    assert frozen and brain.freezer.steps == 4
    names = [n for n in brain.freezer.groups[frozen[0]]]
    before = {n: p.detach().clone() for n, p in brain.modules.named_parameters()}
    fit(brain, dataset(), epochs=2)
    for name, p in brain.modules.named_parameters():
        assert torch.equal(p, before[name]) == (name in names), name
    assert len(brain.clipper().bounds) == 1  # the noise scale covers the trained layer only
    assert json.loads((tmp_path / "freeze.json").read_text())["frozen"] == frozen
    summary = json.loads((tmp_path / "privacy.json").read_text())
    assert summary["frozen_layers"] == frozen
    assert summary["trained_parameters"] < summary["total_parameters"]


def test_freezing_without_warm_start_is_refused(tmp_path):
    brain = make_brain(hparams(tmp_path, warm_start_epochs=0, freeze_fraction=0.5))
    with pytest.raises(ValueError, match="layer freezing needs public warm-start steps"):
        brain.public_warm_start(dataset(n=4), {"batch_size": 2})


# -- accounting, budget, resume ------------------------------------------------------------
def test_epsilon_in_results_equals_the_accountant(tmp_path):
    brain = make_brain(hparams(tmp_path, accountant="rdp"))
    fit(brain, dataset(), epochs=2)
    summary = json.loads((tmp_path / "privacy.json").read_text())
    assert summary["steps"] == 20 and summary["sample_rate"] == pytest.approx(0.1)
    assert summary["epsilon"] == epsilon(0.1, SIGMA, 20, DELTA, "rdp")
    assert summary["expected_batch_size"] == BATCH and summary["dataset_size"] == N


def test_target_epsilon_stops_before_exceeding_it(tmp_path):
    target = epsilon(0.1, SIGMA, 13, DELTA) * 1.0001  # allows 13 steps, not 14
    brain = make_brain(hparams(tmp_path, target_epsilon=target))
    fit(brain, dataset(), epochs=5)
    assert brain.ledger.steps == 13 and brain.stopped_at_target
    summary = json.loads((tmp_path / "privacy.json").read_text())
    assert summary["epsilon"] <= target and summary["stopped_at_target"]


def resumable(tmp_path, interval_steps=0):
    """A brain whose model, epoch counter and DP state are checkpointed every ``interval_steps``."""
    counter = sb.utils.epoch_loop.EpochCounter(2)
    ckpt = sb.utils.checkpoints.Checkpointer(str(tmp_path / "save"))
    model = mlp()
    ckpt.add_recoverables({"model": model, "counter": counter})
    brain = make_brain(hparams(tmp_path), model=model, lr=0.1, checkpointer=ckpt,
                       run_opts={"ckpt_interval_steps": interval_steps, "ckpt_interval_minutes": 0})
    return brain, counter


class Crash(RuntimeError):
    pass


def test_resume_mid_epoch_continues_the_ledger_and_the_run(tmp_path):
    """Killed after 6 steps (last checkpoint after 4): the resumed run = the uninterrupted one."""
    straight, counter = resumable(tmp_path / "a")
    straight.fit(counter, dataset(), progressbar=False)
    expected = flat_params(straight)

    crashing, counter = resumable(tmp_path / "b", interval_steps=4)
    original = crashing.fit_batch
    crashing.fit_batch = lambda batch: (_ for _ in ()).throw(Crash()) if crashing.optimizer_step == 6 \
        else original(batch)
    with pytest.raises(Crash):
        crashing.fit(counter, dataset(), progressbar=False)
    assert crashing.ledger.steps == 6

    resumed, counter = resumable(tmp_path / "b", interval_steps=4)
    resumed.fit(counter, dataset(), progressbar=False)
    assert resumed.ledger.steps == straight.ledger.steps == 20
    assert resumed.ledger.epsilon() == epsilon(0.1, SIGMA, 20, DELTA)
    assert torch.allclose(flat_params(resumed), expected, atol=1e-6)  # same batches, same noise


def test_resume_after_an_epoch_never_undercounts(tmp_path):
    brain, counter = resumable(tmp_path)
    counter.limit = 1
    brain.fit(counter, dataset(), progressbar=False)
    brain.checkpointer.save_checkpoint()
    again, counter = resumable(tmp_path)
    again.fit(counter, dataset(), progressbar=False)
    assert again.ledger.steps == 20
    assert json.loads((tmp_path / "privacy.json").read_text())["epsilon"] == epsilon(0.1, SIGMA, 20, DELTA)


# -- configuration and composition ---------------------------------------------------------
@pytest.mark.parametrize("overrides, match", [
    (dict(noise_multiplier=None), "needs the hyper-parameter 'noise_multiplier'"),
    (dict(clip_bound=-1.0), "clip_bound must be"),
    (dict(dp_clip_mode="layer"), "dp_clip_mode must be one of flat, uniform, dim"),
    (dict(delta=2.0), "delta must be in"),
    (dict(accountant="gdp"), "accountant must be one of"),
])
def test_bad_configuration_is_one_clear_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_brain(hparams(**overrides))


def test_batch_larger_than_the_data_and_dataloaders_are_refused():
    with pytest.raises(ValueError, match="exceeds the 40 private training examples"):
        fit(make_brain(hparams(dp_batch_size=41)), dataset())
    loader = torch.utils.data.DataLoader(dataset(), batch_size=4)
    with pytest.raises(ValueError, match="pass the training \\*dataset\\*"):
        fit(make_brain(hparams()), loader)
    with pytest.raises(ValueError, match="grad_accumulation_factor"):
        make_brain(hparams(), run_opts={"grad_accumulation_factor": 2})


class ToyRecipe(PrivasrBrain):
    """The recipe part of ToyDPBrain, with no training step of its own."""

    batch_to_tensors = ToyDPBrain.batch_to_tensors
    shard_loss = ToyDPBrain.shard_loss


def test_make_dp_brain_adds_only_the_training_step():
    dp_class = make_dp_brain(ToyRecipe)
    assert dp_class.__mro__[1:3] == (DPSGDBrain, ToyRecipe) and dp_class.__name__ == "DPToyRecipe"
    assert make_dp_brain(ToyRecipe, "ToyDP").__name__ == "ToyDP" and make_dp_brain(dp_class) is dp_class
    brain = dp_class(modules={"model": mlp()}, opt_class=lambda p: torch.optim.SGD(p, lr=0.1),
                     hparams=hparams(), run_opts={"device": "cpu"})
    fit(brain, dataset())
    assert brain.ledger.steps == 10
    same = make_brain(hparams(), lr=0.1)  # the same recipe written on DPSGDBrain directly: the same run
    assert torch.equal(flat_params(brain), fit(same, dataset()))
    with pytest.raises(ValueError, match="PrivasrBrain"):
        make_dp_brain(sb.Brain)
    per_core = type(make_toy_brain(dict(clipping="none")))  # a recipe with the per-core step: refused, saying how
    with pytest.raises(ValueError, match=r"ToyBrain is a PerCoreBrain .* make_dp_brain\(ToyBrainRecipe\)"):
        make_dp_brain(per_core)
