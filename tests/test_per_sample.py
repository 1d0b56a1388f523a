"""Per-example and per-shard gradients (torch.func) against a loop over single examples."""
import pytest
import torch
from speechbrain.lobes.models.transformer.Conformer import ConformerEncoder, ConvolutionModule
from speechbrain.nnet.attention import RelPosEncXL

from privasr.models.encoder import MaskedConvolutionModule
from privasr.per_sample import shard_grads_loop, shard_grads_vmap, split_into_shards

from .toy import mse_loss_fn, toy_batch, toy_model


def make_padding_safe(encoder):
    """Swap in privasr's convolution module (zeroes padding before the depthwise conv)."""
    for module in encoder.modules():
        if type(module) is ConvolutionModule:
            module.__class__ = MaskedConvolutionModule


class TinyConformer(torch.nn.Module):
    """SpeechBrain's ConformerEncoder with RelPosMHAXL and a linear head (dropout 0)."""

    def __init__(self, d_model=16, feats=5, out=4):
        super().__init__()
        self.inp = torch.nn.Linear(feats, d_model)
        self.pos = RelPosEncXL(d_model)
        self.encoder = ConformerEncoder(num_layers=2, d_model=d_model, d_ffn=32, nhead=2, kernel_size=3,
                                        dropout=0.0, attention_type="RelPosMHAXL")
        make_padding_safe(self.encoder)
        self.head = torch.nn.Linear(d_model, out)

    def forward(self, x, lens):
        """x: [B, T, feats]; lens: absolute lengths [B]. Returns the masked mean of outputs per example."""
        steps = torch.arange(x.shape[1], device=x.device)
        pad = steps.unsqueeze(0) >= lens.unsqueeze(1)  # True on padding
        h = self.inp(x).masked_fill(pad.unsqueeze(-1), 0.0)
        h, _ = self.encoder(h, src_key_padding_mask=pad, pos_embs=self.pos(h))
        y = self.head(h).masked_fill(pad.unsqueeze(-1), 0.0)
        return y.sum(1) / lens.unsqueeze(1)


def conformer_loss(model):
    def loss(x, lens, target):
        return ((model(x, lens) - target) ** 2).sum(1).mean()
    return loss


def padded_batch(lengths, feats=5, out=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(len(lengths), max(lengths), feats)
    for i, n in enumerate(lengths):
        x[i, :n] = torch.randn(n, feats, generator=g)
        x[i, n:] = 100.0  # garbage in the padding: it must not leak anywhere
    return x, torch.tensor(lengths), torch.randn(len(lengths), out, generator=g)


def test_per_example_grads_of_conformer_match_single_unpadded_examples():
    """One shard per example (K = N, what PEC and DP-SGD use), vmap and loop: each example's gradient in the
    padded batch is the gradient of that example alone, unpadded."""
    torch.manual_seed(0)
    model = TinyConformer()
    x, lens, target = padded_batch([7, 4, 6])
    loss = conformer_loss(model)
    grads, losses = shard_grads_vmap(model, loss, (x, lens, target), num_shards=3)
    looped = list(shard_grads_loop(model, loss, (x, lens, target), num_shards=3))
    params = [p for p in model.parameters() if p.requires_grad]
    for i, n in enumerate(lens.tolist()):
        single = loss(x[i:i + 1, :n], lens[i:i + 1], target[i:i + 1])
        expected = torch.autograd.grad(single, params, allow_unused=True)
        assert float(losses[i]) == pytest.approx(float(single.detach()), rel=1e-5)
        assert float(looped[i][1]) == pytest.approx(float(single.detach()), rel=1e-5)
        for g, gl, e in zip(grads, looped[i][0], expected):
            e = torch.zeros_like(g[i]) if e is None else e
            gl = torch.zeros_like(g[i]) if gl is None else gl
            assert torch.allclose(g[i], e, rtol=1e-4, atol=1e-6), float((g[i] - e).abs().max())
            assert torch.allclose(gl, e, rtol=1e-4, atol=1e-6), float((gl - e).abs().max())


def test_vmap_and_loop_shard_gradients_agree():
    model = toy_model()
    x, y = toy_batch()
    vm, vm_losses = shard_grads_vmap(model, mse_loss_fn(model), (x, y), 4)
    for k, (grads, loss) in enumerate(shard_grads_loop(model, mse_loss_fn(model), (x, y), 4)):
        assert float(loss) == pytest.approx(float(vm_losses[k]), rel=1e-6)
        for a, b in zip(grads, vm):
            assert torch.allclose(a, b[k], rtol=1e-5, atol=1e-7)


def test_shards_split_evenly_and_refuse_impossible_splits():
    x = torch.arange(10)
    shards = split_into_shards((x,), 3)
    assert [s[0].tolist() for s in shards] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    with pytest.raises(ValueError, match="cannot feed"):
        split_into_shards((x,), 11)
    with pytest.raises(ValueError, match="divide evenly"):
        shard_grads_vmap(toy_model(), mse_loss_fn(toy_model()), toy_batch(n=6), 4)


def test_frozen_parameters_are_left_out():
    model = toy_model()
    model[0].weight.requires_grad_(False)
    x, y = toy_batch()
    grads, _ = shard_grads_vmap(model, mse_loss_fn(model), (x, y), num_shards=len(x))
    assert len(grads) == 3 and grads[0].shape == (8, 8)  # model[0].bias comes first
    looped, _ = next(shard_grads_loop(model, mse_loss_fn(model), (x, y), num_shards=len(x)))
    assert [g.shape for g in looped] == [g.shape[1:] for g in grads]


def test_speechbrain_conformer_alone_leaks_padding():
    """Why make_padding_safe (MaskedConvolutionModule) exists: without it a padded example's gradient changes."""
    torch.manual_seed(0)
    model = TinyConformer()
    for module in model.encoder.modules():  # undo the fix
        if type(module) is MaskedConvolutionModule:
            module.__class__ = ConvolutionModule
    x, lens, target = padded_batch([7, 4])
    loss = conformer_loss(model)
    padded = loss(x[1:2], lens[1:2], target[1:2])
    alone = loss(x[1:2, :4], lens[1:2], target[1:2])
    assert abs(float(padded) - float(alone)) > 1e-3
