"""BEST-RQ on a tiny encoder: targets, masking, determinism, padding, learning."""
import pytest
import torch
from speechbrain.nnet.quantisers import RandomProjectionQuantizer
from torch import nn

from privasr.models.bestrq import BestRQ

FEAT, DIM, S = 6, 16, 4


class TinyEncoder(nn.Module):
    """Stack S frames -> linear -> zero padding -> conv(k=3) over time -> [B, ceil(T/S), DIM]."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(FEAT * S, DIM)
        self.conv = nn.Conv1d(DIM, DIM, 3, padding=1)

    def forward(self, feats, lens):
        b, t, f = feats.shape
        frames = -(-t // S)
        x = nn.functional.pad(feats, (0, 0, 0, frames * S - t)).reshape(b, frames, S * f)
        valid = torch.arange(frames) < torch.ceil(torch.round(lens * t) / S).unsqueeze(1)
        x = torch.tanh(self.proj(x)) * valid.unsqueeze(-1)
        return x + torch.tanh(self.conv(x.transpose(1, 2)).transpose(1, 2))


def make(seed=0, **kwargs):
    torch.manual_seed(123)
    kwargs = dict(codebook_size=16, codebook_dim=8, stack_frames=S, mask_prob=0.2, mask_span=2, seed=seed) | kwargs
    return BestRQ(TinyEncoder(), FEAT, DIM, **kwargs)


def data(batch=4, frames=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 6.28, frames)
    feats = torch.sin(t[None, :, None] * torch.arange(1, FEAT + 1) + torch.randn(batch, 1, FEAT, generator=g))
    return feats + 0.1 * torch.randn(batch, frames, FEAT, generator=g), torch.tensor([1.0, 0.8, 0.6, 1.0])[:batch]


def test_codes_equal_speechbrains_quantizer():
    model = make()
    feats, _ = data()
    u = model.stack(feats)
    assert torch.equal(model.quantizer(u), (nn.functional.normalize(u @ model.quantizer.P, dim=-1)
                                            @ model.quantizer.CB.t()).argmax(-1))
    assert isinstance(model.quantizer, RandomProjectionQuantizer)
    assert not any(p.requires_grad for p in model.quantizer.parameters())
    assert sorted(n for n, _ in model.named_parameters() if n.startswith("quantizer")) == []


def test_targets_exclude_padding_and_ignore_its_values():
    model = make()
    feats, lens = data()
    targets = model.targets(feats, lens)
    garbage = feats.clone()
    garbage[2, 24:] = 1e3 * torch.randn(16, FEAT)  # utterance 2 has 24 valid frames = 6 stacked frames
    assert torch.equal(model.targets(garbage, lens)[:, :6], targets[:, :6])
    alone = model.targets(feats[2:3, :24], torch.ones(1))
    assert torch.equal(alone[0], targets[2, :6])


def test_mask_is_spans_on_valid_frames_and_deterministic_under_seed():
    feats, lens = data()
    a, b, c = make(seed=1), make(seed=1), make(seed=2)
    ma, mb, mc = (m.sample_mask(lens, feats.shape[1]) for m in (a, b, c))
    assert torch.equal(ma, mb) and not torch.equal(ma, mc)
    assert not ma[2, 6:].any() and not ma[1, 8:].any()  # never on padding
    assert torch.equal(a.quantizer.CB, b.quantizer.CB) and not torch.equal(a.quantizer.CB, c.quantizer.CB)
    assert a(feats, lens).item() == b(feats, lens).item()
    big = make(mask_prob=0.04, mask_span=10).sample_mask(torch.ones(64), 4000)
    assert big.float().mean().item() == pytest.approx(1 - 0.96 ** 10, abs=0.03)  # ~1/3 as in BEST-RQ


def test_masked_frames_are_replaced_by_noise_only_there():
    model = make(noise_std=0.1)
    feats, lens = data()
    batch = model.prepare(feats, lens)
    frame_mask = batch.mask.repeat_interleave(S, dim=1)[:, :feats.shape[1]]
    assert torch.equal(batch.inputs[~frame_mask], feats[~frame_mask])
    replaced = batch.inputs[frame_mask]
    assert replaced.numel() > 0 and replaced.std().item() == pytest.approx(0.1, rel=0.3)


def test_padding_does_not_change_any_examples_loss():
    model = make(noise_std=0.0)
    feats, lens = data()
    mask = model.sample_mask(lens, feats.shape[1])
    loss = model(feats, lens, mask=mask, reduction="per_example")
    garbage = feats.clone()
    garbage[1, 32:] = 50.0
    garbage[2, 24:] = -7.0
    torch.testing.assert_close(model(garbage, lens, mask=mask, reduction="per_example"), loss, rtol=0, atol=1e-6)
    alone = model(feats[2:3, :24], torch.ones(1), mask=mask[2:3, :6], reduction="per_example")
    torch.testing.assert_close(alone, loss[2:3], rtol=0, atol=1e-6)
    mean = model(feats, lens, mask=mask)
    per_frame = (loss * mask.sum(1)).sum() / mask.sum()
    torch.testing.assert_close(mean, per_frame)


def test_loss_decreases_with_adam_on_fixed_data():
    torch.manual_seed(0)
    model = make(mask_prob=0.15, mask_span=2)
    feats, lens = data()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(40):
        loss = model(feats, lens)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first == pytest.approx(torch.log(torch.tensor(16.0)).item(), rel=0.25)
    assert last < 0.8 * first, losses


def test_bad_arguments():
    with pytest.raises(ValueError, match="mask_prob"):
        make(mask_prob=1.5)
    with pytest.raises(ValueError, match="stack_frames"):
        make(stack_frames=0)
    with pytest.raises(ValueError, match="encoder has no method"):
        BestRQ(TinyEncoder(), FEAT, DIM, encoder_method="encode")
    model = make()
    with pytest.raises(ValueError, match="feats must be"):
        model(torch.zeros(2, 8, FEAT + 1), torch.ones(2))
    with pytest.raises(ValueError, match="reduction"):
        model(*data(), reduction="sum")
    with pytest.raises(ValueError, match="encoder must return"):
        BestRQ(TinyEncoder(), FEAT, DIM + 1, codebook_size=16)(*data())


class LossOnly(nn.Module):
    """Exposes BestRQ.loss as forward, for torch.func.functional_call."""

    def __init__(self, bestrq):
        super().__init__()
        self.bestrq = bestrq

    def forward(self, inputs, lens, targets, mask):
        return self.bestrq.loss(inputs, lens, targets, mask)


def test_loss_supports_per_example_gradients_with_torch_func():
    """The documented DP path: prepare() outside, vmap(grad(loss)) inside, equal to a loop."""
    from torch.func import functional_call, grad, vmap

    model = make()
    wrapper = LossOnly(model)
    feats, lens = data()
    batch = model.prepare(feats, lens)
    params = {n: p.detach() for n, p in wrapper.named_parameters()}

    def one(p, x, l, y, m):
        return functional_call(wrapper, p, (x[None], l[None], y[None], m[None]))

    per_example = vmap(grad(one), in_dims=(None, 0, 0, 0, 0))(params, batch.inputs, lens, batch.targets, batch.mask)
    for i in range(feats.shape[0]):
        model.zero_grad()
        model.loss(batch.inputs[i:i + 1], lens[i:i + 1], batch.targets[i:i + 1], batch.mask[i:i + 1]).backward()
        for name, p in wrapper.named_parameters():
            torch.testing.assert_close(per_example[name][i], p.grad, rtol=1e-4, atol=1e-6)


# -- the Brains: one recipe, two training steps ----------------------------------------------
def test_one_recipe_under_the_per_core_and_the_dp_step():
    """BestRQRecipe's methods in both Brains; the DP Brain has no per-core part, so ghost needs no workaround."""
    from privasr.brain import PerCoreBrain, PrivasrBrain
    from privasr.dp.brain import DPSGDBrain, make_dp_brain
    from privasr.ssl.brain import BestRQBrain, BestRQRecipe, DPBestRQBrain

    assert BestRQBrain.__mro__[1:4] == (BestRQRecipe, PerCoreBrain, PrivasrBrain)
    assert DPBestRQBrain.__mro__[1:4] == (DPSGDBrain, BestRQRecipe, PrivasrBrain)
    assert make_dp_brain(BestRQRecipe).__mro__[1:] == DPBestRQBrain.__mro__[1:]
    assert DPBestRQBrain.__module__ == "privasr.ssl.brain" and DPBestRQBrain.__name__ == "DPBestRQBrain"
    for hook in ("batch_to_tensors", "shard_loss", "example_losses", "shard_loss_reduction", "compute_forward",
                 "compute_objectives", "on_stage_start", "export_encoder"):
        assert getattr(BestRQBrain, hook) is getattr(DPBestRQBrain, hook) is getattr(BestRQRecipe, hook), hook
    hparams = dict(noise_multiplier=1.0, clip_bound=1.0, dp_batch_size=2.0, delta=1e-5, core_grad_mode="ghost")
    brain = DPBestRQBrain(modules={"bestrq": make()}, opt_class=lambda p: torch.optim.SGD(p, lr=0.1),
                          hparams=hparams, run_opts={"device": "cpu"})
    assert brain.hparams.core_grad_mode == brain.dp.grad_mode == "ghost"
    assert not any(hasattr(brain, a) for a in ("clip_config", "_accumulator", "_clip_monitor", "_core_log"))
    model = make()
    feats, lens = data()
    batch = model.prepare(feats, lens)
    tensors = (batch.inputs, lens, batch.targets, batch.mask)
    brain.modules.bestrq.load_state_dict(model.state_dict())
    with torch.no_grad():
        per_example = brain.example_losses(*tensors)
        alone = [float(brain.shard_loss(*(t[i:i + 1] for t in tensors))) for i in range(4)]
    assert per_example.tolist() == pytest.approx(alone, rel=1e-5)  # entry i: example i's shard loss alone
