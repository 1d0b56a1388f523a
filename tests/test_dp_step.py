"""DPSGDStep: the noisy clipped mean against a second implementation (torch.func per-example gradients, hand
clipping, the same noise drawn by hand), the empty step, frozen parameters, and DPSGDBrain taking the same step."""
import math

import pytest
import speechbrain as sb
import torch
from torch.func import functional_call, grad, vmap

from privasr.accounting import PrivacyLedger
from privasr.dp.noise import NoiseSource, make_generator
from privasr.dp.per_layer import PerLayerClipper
from privasr.dp.step import DPSGDStep

from .test_dp_brain import dataset, hparams, make_brain, mlp

SIGMA, C, QN, Q = 1.3, 0.7, 4.0, 0.1
REGEX = r"^(\d+)\."  # the MLP's two Linear layers are the two clipping groups


def loss_fn(model):
    return lambda x, y: ((model(x) - y) ** 2).sum(dim=1).mean()


def batch(n=5, seed=1):
    data = dataset(n=n, seed=seed)
    return torch.stack([x for x, _ in data]), torch.stack([y for _, y in data])


def reference_update(model, x, y, mode, noise_seed):
    r"""(1/qN) (sum_i clip(g_i) + N(0, sigma^2 C^2)), every piece written out: vmap per-example gradients,
    per-group factors min(1, C_k / ||g_ik||) (1 at zero norm), then the noise drawn parameter by parameter in order."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def one(p, xi, yi):
        return ((functional_call(model, p, (xi[None],)) - yi[None]) ** 2).sum(dim=1).mean()

    per_example = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    names = list(params)
    groups = [n.split(".")[0] for n in names] if mode != "flat" else ["all"] * len(names)
    sizes = {g: sum(params[n].numel() for n, k in zip(names, groups) if k == g) for g in groups}
    total = sum(sizes.values())
    bound = {g: C if mode == "flat" else C * math.sqrt(sizes[g] / total) if mode == "dim"
             else C / math.sqrt(len(sizes)) for g in sizes}
    summed = {n: torch.zeros_like(params[n]) for n in names}
    for i in range(x.shape[0]):
        for g in sizes:
            members = [n for n, k in zip(names, groups) if k == g]
            norm = math.sqrt(sum(float(per_example[n][i].double().pow(2).sum()) for n in members))
            for n in members:
                summed[n] += per_example[n][i] * (min(1.0, bound[g] / norm) if norm > 0 else 1.0)
    gen = make_generator(noise_seed)
    return [(summed[n] + torch.randn(params[n].shape, generator=gen) * SIGMA * C) / QN for n in names]


def make_step(model, mode="dim", grad_mode="loop", seed=9, ledger=None):
    clipper = PerLayerClipper(model.named_parameters(), C, mode, REGEX)
    return DPSGDStep(model, clipper, SIGMA, QN, NoiseSource(seed), grad_mode, micro_batch=2, ledger=ledger,
                     sample_rate=Q if ledger is not None else None)


@pytest.mark.parametrize("mode", ["flat", "uniform", "dim"])
@pytest.mark.parametrize("grad_mode", ["loop", "vmap", "ghost"])
def test_update_equals_the_vmap_reference_with_the_same_noise(mode, grad_mode):
    model = mlp()
    x, y = batch()
    ledger = PrivacyLedger(1e-5)
    step = make_step(model, mode, grad_mode, ledger=ledger)
    examples = lambda x, y: ((model(x) - y) ** 2).sum(dim=1)  # noqa: E731  each example's loss, one forward
    step.backward(loss_fn(model), x[:3], y[:3], ghost_loss_fn=examples)  # two calls: more examples of one step
    step.backward(loss_fn(model), x[3:], y[3:], ghost_loss_fn=examples)
    stats = step.reduce()
    expected = reference_update(model, x, y, mode, noise_seed=9)
    for p, e in zip(model.parameters(), expected):
        assert torch.allclose(p.grad, e, rtol=1e-5, atol=1e-6), (grad_mode, float((p.grad - e).abs().max()))
    assert (stats.num_kept, stats.num_dropped) == (5, 0)
    assert ledger.history == [(SIGMA, Q, 1)]  # the release is counted once
    assert float(stats.loss) == pytest.approx(float(((model(x) - y) ** 2).sum(dim=1).mean().detach()), rel=1e-5)


def test_a_step_without_examples_is_the_noise_alone_and_still_counts():
    model = mlp()
    ledger = PrivacyLedger(1e-5)
    grads, stats = make_step(model, ledger=ledger).noisy_mean()
    gen = make_generator(9)
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(g, torch.randn(p.shape, generator=gen).mul_(SIGMA * C) / QN)
    assert ledger.steps == 1 and stats.num_kept == 0 and math.isnan(float(stats.loss))
    assert stats.clipped_fraction is None


def test_frozen_parameters_get_no_gradient_and_no_noise():
    model = mlp()
    for p in model[0].parameters():
        p.requires_grad_(False)
    x, y = batch()
    step = make_step(model)
    assert step.clipper.names == ["2.weight", "2.bias"] and len(step.clipper.bounds) == 1
    step.backward(loss_fn(model), x, y)
    step.reduce()
    assert model[0].weight.grad is None and model[0].bias.grad is None
    assert model[2].weight.grad.abs().sum() > 0


def test_nonfinite_examples_are_dropped_and_counted():
    model = mlp()
    x, y = batch()
    y[1, 0] = float("nan")
    step = make_step(model)
    step.backward(loss_fn(model), x, y)
    grads, stats = step.noisy_mean()
    assert (stats.num_kept, stats.num_dropped) == (4, 1) and all(torch.isfinite(g).all() for g in grads)
    keep = torch.tensor([0, 2, 3, 4])
    expected = reference_update(model, x[keep], y[keep], "dim", noise_seed=9)
    assert all(torch.allclose(g, e, rtol=1e-5, atol=1e-6) for g, e in zip(grads, expected))


def test_bad_construction_is_one_clear_error():
    model = mlp()
    clipper = PerLayerClipper(model.named_parameters(), C, "dim", REGEX)
    model[0].weight.requires_grad_(False)  # frozen after the clipper was built
    with pytest.raises(ValueError, match="build the PerLayerClipper on model.named_parameters\\(\\) after freezing"):
        DPSGDStep(model, clipper, SIGMA, QN)
    model[0].weight.requires_grad_(True)
    with pytest.raises(ValueError, match="a ledger needs the sample_rate"):
        DPSGDStep(model, clipper, SIGMA, QN, ledger=PrivacyLedger(1e-5))
    with pytest.raises(ValueError, match="expected_batch_size"):
        DPSGDStep(model, clipper, SIGMA, 0.0)
    with pytest.raises(ValueError, match="unknown grad_mode 'loops'"):
        DPSGDStep(model, clipper, SIGMA, QN, grad_mode="loops")


@pytest.mark.parametrize("grad_mode", ["loop", "vmap"])
def test_dp_brain_takes_exactly_the_steps_of_the_object(grad_mode):
    """DPSGDBrain.fit over one Poisson epoch = DPSGDStep + SGD(lr=1) over the same batches, bit for bit."""
    brain = make_brain(hparams(dp_clip_mode="dim", core_grad_mode=grad_mode, dp_micro_batch=3,
                               layer_regex=r"^(model\.\d+)\."))
    brain.fit(sb.utils.epoch_loop.EpochCounter(1), train_set=dataset(), progressbar=False)

    model, data = mlp(), dataset()
    hp = hparams()
    clipper = PerLayerClipper(model.named_parameters(), hp["clip_bound"], "dim", REGEX)
    ledger = PrivacyLedger(hp["delta"])
    step = DPSGDStep(model, clipper, hp["noise_multiplier"], hp["dp_batch_size"], NoiseSource(hp["noise_seed"]),
                     grad_mode, 3, ledger, brain.sample_rate)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    for t in range(len(brain.sampler)):
        chosen = brain.sampler.global_batch(t, 1)
        if chosen:
            step.backward(loss_fn(model), torch.stack([data[i][0] for i in chosen]),
                          torch.stack([data[i][1] for i in chosen]))
        step.reduce()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert torch.equal(torch.cat([p.detach().flatten() for p in model.parameters()]),
                       torch.cat([p.detach().flatten() for p in brain.modules.parameters()]))
    assert ledger.history == brain.ledger.history
