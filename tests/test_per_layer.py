"""Per-layer clipping: bounds, per-example norms, the clipped sum, grouping, robustness."""
import math

import pytest
import torch
from torch import nn

from privasr.dp.per_layer import (
    LAYER_REGEX,
    PerLayerClipper,
    clip_per_layer,
    group_parameters_by_layer,
    layer_bounds,
)


class Tiny(nn.Module):
    """Front-end, two 'Conformer' blocks, a final norm and a head, named as in SpeechBrain."""

    def __init__(self):
        super().__init__()
        self.frontend = nn.Linear(3, 4)
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)) for _ in range(2)])
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.frontend(x)
        for layer in self.layers:
            x = x + layer(x)
        return self.head(self.norm(x))


def per_example_grads(model, x, y):
    """Plain loop: one backward per example, stacked to [B, *shape]."""
    grads = []
    for xi, yi in zip(x, y):
        model.zero_grad()
        nn.functional.cross_entropy(model(xi[None]), yi[None]).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    return [torch.stack(gs) for gs in zip(*grads)]


@pytest.mark.parametrize("mode,sizes", [("uniform", [3, 50, 7, 1000]), ("dim", [3, 50, 7, 1000]), ("flat", [77])])
def test_bounds_square_sum_to_C_squared(mode, sizes):
    bounds = layer_bounds(2.5, sizes, mode)
    assert sum(b * b for b in bounds) == pytest.approx(2.5 ** 2)
    if mode == "uniform":
        assert bounds == pytest.approx([2.5 / 2] * 4)
    if mode == "dim":
        assert bounds[3] / bounds[0] == pytest.approx(math.sqrt(1000 / 3))


def test_default_grouping_of_a_speechbrain_style_encoder():
    groups = group_parameters_by_layer(Tiny().named_parameters())
    assert list(groups) == ["frontend", "layers.0", "layers.1", "norm", "head"]
    assert groups["layers.1"] == ["layers.1.0.weight", "layers.1.0.bias", "layers.1.2.weight", "layers.1.2.bias"]
    nested = group_parameters_by_layer([("model.encoder.layers.11.ffn.w.weight", None), ("model.head.b", None),
                                        ("model.proj.w", None)])
    assert list(nested) == ["model.encoder.layers.11", "model.head", "model"]  # the rest: its top-level module
    assert list(group_parameters_by_layer(Tiny().named_parameters(), 2))[:3] == ["frontend", "layers.0", "layers.1"]
    assert list(group_parameters_by_layer(Tiny().named_parameters(), r"^(head|norm)")) == [
        "frontend", "layers", "norm", "head"]
    with pytest.raises(ValueError, match="depth_or_regex"):
        group_parameters_by_layer(Tiny().named_parameters(), 0)


def _real_models():
    """The tiny Conformer-CTC and BEST-RQ as a Brain holds them (``modules`` keys prefix every name)."""
    from privasr.models import build_model
    from privasr.models.bestrq import BestRQ
    from privasr.ssl.pretrained import build_encoder

    torch.manual_seed(0)
    encoder = build_encoder("tiny", dropout=0.0)
    bestrq = BestRQ(encoder, 80, encoder.d_model, codebook_size=16, encoder_method="encode")
    return nn.ModuleDict({"bestrq": bestrq}), nn.ModuleDict({"model": build_model("tiny", 10, dropout=0.0)})


def test_the_default_regex_groups_the_real_conformer_and_bestrq_parameters():
    """One group per Conformer block, the front end, the final norm and the head, each holding exactly the
    parameters of that module (the reference: ``get_submodule``), in forward order; nothing falls back."""
    bestrq, ctc = _real_models()
    blocks = [f"encoder.conformer.layers.{i}" for i in range(len(ctc.model.encoder.conformer.layers))]
    assert len(blocks) == 2  # tiny
    for modules, key, head in [(bestrq, "bestrq", "head"), (ctc, "model", "ctc_head")]:
        expected = [f"{key}.{m}" for m in ["encoder.subsampling", *blocks, "encoder.conformer.norm", head]]
        groups = group_parameters_by_layer(modules.named_parameters())
        assert group_parameters_by_layer(modules.named_parameters(), LAYER_REGEX) == groups
        assert list(groups) == expected
        for path, names in groups.items():
            assert names == [f"{path}.{n}" for n, _ in modules.get_submodule(path).named_parameters()], path
    # the models' own grouping (privasr.models.encoder_param_groups) is this one under short names
    own = ctc.model.param_groups()
    assert [[f"model.{n}" for n in names] for names in own.values()] == list(
        group_parameters_by_layer(ctc.named_parameters()).values())
    clipper = PerLayerClipper(bestrq.named_parameters(), max_norm=1.0, mode="dim")
    assert list(clipper.groups) == list(group_parameters_by_layer(bestrq.named_parameters()))


@pytest.mark.parametrize("mode", ["flat", "uniform", "dim"])
def test_clipped_sum_matches_a_loop_and_each_example_respects_its_bounds(mode):
    torch.manual_seed(0)
    model = Tiny()
    x, y = torch.randn(6, 3) * 5, torch.randint(0, 2, (6,))
    grads = per_example_grads(model, x, y)
    clipper = PerLayerClipper(model.named_parameters(), max_norm=0.3, mode=mode)
    result = clipper(grads)
    expected = [torch.zeros_like(g[0]) for g in grads]
    for i in range(6):
        total_sq = 0.0
        for k, bound in enumerate(clipper.bounds):
            members = [j for j, gk in enumerate(clipper.group_of) if gk == k]
            norm = torch.sqrt(sum(grads[j][i].pow(2).sum() for j in members))
            factor = min(1.0, bound / norm.item()) if norm.item() > 0 else 1.0
            for j in members:
                expected[j] += grads[j][i] * factor
            total_sq += (norm.item() * factor) ** 2
        assert total_sq <= 0.3 ** 2 * (1 + 1e-6)  # the whole example still has norm <= C
    for got, want in zip(result.summed, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert result.num_kept == 6 and result.num_dropped == 0
    assert all(0.0 <= f <= 1.0 for f in result.clipped_fraction) and max(result.clipped_fraction) > 0


def test_zero_gradients_give_zero_not_nan():
    grads = [torch.zeros(4, 3, 2), torch.zeros(4, 5)]
    result = clip_per_layer(grads, [0, 1], [0.5, 0.5])
    assert all(torch.equal(s, torch.zeros_like(s)) for s in result.summed)
    assert result.clipped_fraction == [0.0, 0.0]


def test_non_finite_examples_are_dropped_and_counted():
    grads = [torch.ones(4, 3), torch.ones(4, 2)]
    grads[0][1, 0] = float("nan")
    grads[1][3, 1] = float("inf")
    result = clip_per_layer(grads, [0, 0], [100.0])
    assert result.num_dropped == 2 and result.num_kept == 2
    assert torch.equal(result.summed[0], torch.full((3,), 2.0))
    assert torch.equal(result.summed[1], torch.full((2,), 2.0))


def test_frozen_parameters_are_left_out_of_groups_and_bounds():
    model = Tiny()
    model.layers[0].requires_grad_(False)
    clipper = PerLayerClipper(model.named_parameters(), max_norm=1.0, mode="dim")
    assert "layers.0" not in clipper.groups and len(clipper.names) == 10
    assert sum(b * b for b in clipper.bounds) == pytest.approx(1.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        layer_bounds(1.0, [3], "layerwise")
    with pytest.raises(ValueError, match="flat"):
        layer_bounds(1.0, [3, 4], "flat")
    with pytest.raises(ValueError, match="max_norm"):
        layer_bounds(0.0, [3], "dim")
    with pytest.raises(ValueError, match="one group index per gradient"):
        clip_per_layer([torch.zeros(2, 3)], [0, 0], [1.0])


@pytest.mark.parametrize("mode", ["flat", "dim"])
def test_factors_from_squared_norms_are_those_of_clip_per_layer(mode):
    """The ghost route's factors (from per-parameter squared norms) reproduce clip_per_layer's sum and counts."""
    torch.manual_seed(0)
    model = Tiny()
    x, y = torch.randn(6, 3) * 5, torch.randint(0, 2, (6,))
    grads = per_example_grads(model, x, y)
    grads[0][2] = float("nan")  # example 2 is dropped by both
    clipper = PerLayerClipper(model.named_parameters(), max_norm=0.3, mode=mode)
    expected = clipper(grads)
    sq = {n: g.reshape(6, -1).double().pow(2).sum(1) for n, g in zip(clipper.names, grads)}
    factors, finite, clipped = clipper.factors_from_sq_norms(sq)
    assert finite.tolist() == [True, True, False, True, True, True] and float(factors[:, 2].abs().sum()) == 0.0
    safe = [torch.where(finite.view(-1, *[1] * (g.dim() - 1)), g, torch.zeros_like(g)) for g in grads]
    summed = [torch.einsum("b,b...->...", factors[k].float(), g) for g, k in zip(safe, clipper.group_of)]
    for got, want in zip(summed, expected.summed):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    assert clipped == expected.clipped_fraction
    with pytest.raises(ValueError, match="sq_norms lacks 1 trained parameter"):
        clipper.factors_from_sq_norms({n: v for n, v in list(sq.items())[1:]})
