"""LayerFreezer: scores by hand, selection, persistence, and frozen layers untouched by noisy DP steps."""
import json

import pytest
import torch
from torch import nn

from privasr.dp.noise import make_generator, privatize
from privasr.dp.per_layer import PerLayerClipper
from privasr.freezing import LayerFreezer


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.frontend = nn.Linear(3, 4)
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.frontend(x)
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return self.head(x)


def loss_of(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def warm_start(model, freezer, steps=3):
    torch.manual_seed(1)
    hand = {g: 0.0 for g in ["frontend", "layers.0", "layers.1", "layers.2", "head"]}
    for _ in range(steps):
        model.zero_grad()
        loss_of(model, torch.randn(8, 3), torch.randint(0, 2, (8,))).backward()
        freezer.accumulate(model)
        # by hand: ||grad of layer||^2 / D_l
        for g, module in [("frontend", model.frontend), ("head", model.head)] + [
                (f"layers.{i}", m) for i, m in enumerate(model.layers)]:
            params = list(module.parameters())
            hand[g] += sum(float(p.grad.pow(2).sum()) for p in params) / sum(p.numel() for p in params)
    return hand


def test_scores_match_a_hand_computation():
    torch.manual_seed(0)
    model = Tiny()
    freezer = LayerFreezer(model)
    hand = warm_start(model, freezer)
    assert freezer.steps == 3 and list(freezer.scores()) == list(hand)
    for g, s in freezer.scores().items():
        assert s == pytest.approx(hand[g], rel=1e-6)


def test_select_lowest_scores_by_count_or_fraction():
    model = Tiny()
    freezer = LayerFreezer(model)
    warm_start(model, freezer)
    scores = freezer.scores()
    lowest_two = sorted(scores, key=scores.get)[:2]
    assert set(freezer.select(count=2)) == set(lowest_two)
    assert freezer.select(fraction=0.5) == freezer.select(count=2)  # floor(0.5 * 5)
    assert len(freezer.select(fraction=0.5, exclude=["head"])) == 2   # floor(0.5 * 4)
    assert "head" not in freezer.select(count=4, exclude=["head"])
    assert freezer.select(count=0) == []
    for kwargs, match in [({}, "exactly one"), (dict(count=6), "count"), (dict(fraction=1.5), "fraction"),
                          (dict(count=1, exclude=["nope"]), "exclude")]:
        with pytest.raises(ValueError, match=match):
            freezer.select(**kwargs)
    with pytest.raises(ValueError, match="accumulate"):
        LayerFreezer(model).select(count=1)


def test_state_round_trips_through_json(tmp_path):
    model = Tiny()
    freezer = LayerFreezer(model)
    warm_start(model, freezer)
    frozen = freezer.select(count=2)
    freezer.save(tmp_path / "freeze.json")
    saved = json.loads((tmp_path / "freeze.json").read_text())
    assert saved["frozen"] == frozen and set(saved["scores"]) == set(freezer.groups)
    restored = LayerFreezer()
    restored.load(tmp_path / "freeze.json", end_of_epoch=False)
    assert restored.frozen == frozen and restored.scores() == pytest.approx(freezer.scores())
    assert restored.summary() == freezer.summary()
    assert "yes" in freezer.summary() and "2/5 layers frozen" in freezer.summary()


def test_frozen_layers_stay_bit_identical_through_noisy_dp_steps():
    torch.manual_seed(0)
    model = Tiny()
    freezer = LayerFreezer(model)
    warm_start(model, freezer)
    freezer.select(count=2, exclude=["head"])
    frozen_names = freezer.apply(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    clipper = PerLayerClipper(model.named_parameters(), max_norm=1.0, mode="dim")  # trainable only
    params = dict(model.named_parameters())
    generator = make_generator(0)
    for _ in range(3):
        x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
        per_example = []
        for i in range(4):
            grads = torch.autograd.grad(loss_of(model, x[i:i + 1], y[i:i + 1]), [params[n] for n in clipper.names])
            per_example.append(grads)
        stacked = [torch.stack(g) for g in zip(*per_example)]
        noisy = privatize(clipper(stacked).summed, 1.0, 1.0, 4.0, generator=generator)
        for name, grad in zip(clipper.names, noisy):
            params[name].grad = grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert frozen_names and all(not params[n].requires_grad for n in frozen_names)
    for name, p in model.named_parameters():
        if name in frozen_names:
            assert torch.equal(p, before[name]), name
        else:
            assert not torch.equal(p, before[name]), name


def test_default_layers_of_the_real_bestrq_are_the_clippers_and_name_the_recipes_exclude():
    """LayerFreeze and per-layer clipping group by the one LAYER_REGEX; the recipes' freeze_exclude names a layer."""
    from privasr.models.bestrq import BestRQ
    from privasr.ssl.pretrained import build_encoder

    torch.manual_seed(0)
    encoder = build_encoder("tiny", dropout=0.0)
    modules = nn.ModuleDict({"bestrq": BestRQ(encoder, 80, encoder.d_model, codebook_size=16)})
    freezer = LayerFreezer(modules)
    assert freezer.groups == PerLayerClipper(modules.named_parameters(), 1.0, "dim").groups
    assert list(freezer.groups) == ["bestrq.encoder.subsampling", "bestrq.encoder.conformer.layers.0",
                                    "bestrq.encoder.conformer.layers.1", "bestrq.encoder.conformer.norm",
                                    "bestrq.head"]
    assert freezer.sizes["bestrq.head"] == sum(p.numel() for p in modules.bestrq.head.parameters())
