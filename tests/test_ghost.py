"""Ghost norms (privasr.ghost) against vmap per-example gradients, layer type by layer type and on the Conformer."""
import logging
import math

import pytest
import torch

from privasr.clipping import clip_factors, core_norms
from privasr.distributed import CoreAccumulator
import privasr.ghost.pieces as ghost_pieces
from privasr.ghost.pieces import _Conv, _Seq
from privasr.ghost.recorder import _Recorder
from privasr.ghost import accumulate, clipped_sum, ghost_pass, per_example_norms, summed_shard_loss
from privasr.models.sizes import build_model
from privasr.per_sample import shard_grads_vmap, trainable_parameters

RTOL = 1e-5


def vmap_reference(model, loss_fn, tensors, num_units=None):
    """Per-unit gradients by vmap: the exactness reference (loss_fn of one unit: its loss, or [B] losses)."""
    units = num_units or tensors[0].shape[0]
    grads, _ = shard_grads_vmap(model, lambda *shard: loss_fn(*shard).sum(), tensors, units)
    return grads


def assert_norms_match(model, loss_fn, tensors, num_units=None, expect_fallback=()):
    result = ghost_pass(model, loss_fn, tensors, num_units)
    grads = vmap_reference(model, loss_fn, tensors, num_units)
    names = [n for n, _ in trainable_parameters(model)]
    for name, g in zip(names, grads):
        expected = core_norms([g])
        got = result.sq_norms[name].sqrt()
        assert torch.allclose(got, expected, rtol=RTOL, atol=1e-9), (name, got, expected)
    assert torch.allclose(result.norms, core_norms(grads), rtol=RTOL)
    assert sorted(result.fallback) == sorted(expect_fallback), result.fallback
    return result


class SeqModel(torch.nn.Module):
    """``layers`` applied to ``x [N, T, d]``, per-example loss = weighted squares of the output."""

    def __init__(self, *layers):
        super().__init__()
        self.layers = torch.nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


def square_loss(model):
    def loss(x, w):
        out = model(x)
        return (out.pow(2).flatten(1) * w[:, None]).sum(1) + out.flatten(1).sum(1)
    return loss


def seq_batch(n=4, t=5, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, d, generator=g), torch.linspace(0.5, 2.0, n)


class Transpose(torch.nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return x.transpose(self.a, self.b)


@pytest.mark.parametrize("t, ghost", [(3, True), (8, False)])
def test_linear_on_sequences_ghost_and_materialized_branches(t, ghost):
    torch.manual_seed(0)
    model = SeqModel(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 5))
    result = assert_norms_match(model, square_loss(model), seq_batch(t=t))
    assert result.pieces["layers.0.weight"][0].ghost is ghost  # d_in d_out = 30 vs T^2 = 9 / 64


def test_time_first_linear_finds_the_batch_axis():
    torch.manual_seed(0)
    model = SeqModel(Transpose(0, 1), torch.nn.Linear(6, 5), Transpose(0, 1))  # SpeechBrain's feed-forward layout
    assert_norms_match(model, square_loss(model), seq_batch(t=5))


@pytest.mark.parametrize("num_units", [None, 2])
def test_time_first_clipped_sum_equals_vmap_with_a_dropped_example(num_units):
    """Book-keeping on time-first [T, N, d] records (rows stored position-major or as transposed views of
    batch-major ones), scaling a (6 -> 9: d_in < d_out) and g (9 -> 4), a NaN example left out; ghost form
    at T = 3 (54 >= 9, 36 >= 9)."""
    torch.manual_seed(0)
    model = SeqModel(Transpose(0, 1), torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 4),
                     Transpose(0, 1))
    x, w = seq_batch(t=3)
    x[3] = float("nan")
    loss = square_loss(model) if num_units is None else (lambda *t: square_loss(model)(*t).sum())  # noqa: E731
    result = ghost_pass(model, loss, (x, w), num_units)
    assert result.pieces["layers.1.weight"][0].ghost and result.pieces["layers.3.weight"][0].ghost
    grads, _, _ = clipped_sum(model, loss, (x, w), 0.5, num_units=num_units)
    expected, stats = accumulator_reference(model, loss, (x, w), 0.5, "sum", num_units)
    assert stats.dropped == [3 if num_units is None else 1]
    assert_grads_close(grads, expected)


@pytest.mark.parametrize("layouts", [("bm", "bm"), ("pm", "pm"), ("bm", "pm"), ("pm", "bm"), ("pm", "odd")])
def test_scaled_rows_pair_the_same_rows_in_any_layout(layouts):
    """sum_{n,l} (w_n x_nl)^T o_nl from _scaled_rows equals einsum's, for batch-major (bm), position-major (pm)
    and neither (odd: channel-strided, as a pointwise convolution's input) storage; only `other` is copied then."""
    g = torch.Generator().manual_seed(0)

    def stored(kind, d):
        base = torch.randn(4, 3, d, generator=g)
        if kind == "pm":
            return base.transpose(0, 1).contiguous().transpose(0, 1)
        if kind == "odd":
            return base.transpose(1, 2).contiguous().transpose(1, 2)
        return base

    x, other = stored(layouts[0], 5), stored(layouts[1], 2)
    w = torch.tensor([0.5, -1.0, 2.0, 0.0])
    x_rows, other_rows = ghost_pieces._scaled_rows(x, w.view(-1, 1, 1), other)
    expected = torch.einsum("nlx,nlo,n->ox", x, other, w)
    assert torch.allclose(other_rows.T @ x_rows, expected, atol=1e-6)
    if layouts[1] != "odd":
        assert other_rows.data_ptr() == other.data_ptr()  # a view of other's rows


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_pointwise_and_depthwise_and_grouped_conv1d():
    torch.manual_seed(0)
    model = SeqModel(Transpose(1, 2), torch.nn.Conv1d(6, 8, 1),  # pointwise
                     torch.nn.Conv1d(8, 8, 5, padding=2, groups=8),  # depthwise (the Conformer's)
                     torch.nn.Conv1d(8, 4, 3, stride=2, dilation=2, padding=1, groups=2),
                     torch.nn.Conv1d(4, 4, 4, padding="same"))  # even kernel: asymmetric 'same'
    assert_norms_match(model, square_loss(model), seq_batch(t=11))


def test_conv2d_front_end():
    torch.manual_seed(0)

    class Front(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(1, 4, 3, stride=2, padding=1)
            self.c2 = torch.nn.Conv2d(4, 4, 3, stride=2, padding=1)

        def forward(self, x):
            return self.c2(torch.relu(self.c1(x.unsqueeze(1))))

    model = Front()
    assert_norms_match(model, square_loss(model), seq_batch(t=9, d=7))


def test_layer_norm():
    torch.manual_seed(0)
    model = SeqModel(torch.nn.Linear(6, 6), torch.nn.LayerNorm(6))
    with torch.no_grad():
        model.layers[1].weight.uniform_(0.5, 1.5)
        model.layers[1].bias.uniform_(-0.5, 0.5)
    assert_norms_match(model, square_loss(model), seq_batch())


class Embed(torch.nn.Module):
    """An embedding looked up twice (tokens and time-first tokens), padding_idx 0, then a Linear: [N, T, d]."""

    def __init__(self, vocab=7, d=3):
        super().__init__()
        self.table = torch.nn.Embedding(vocab, d, padding_idx=0)
        self.lin = torch.nn.Linear(d, 2)

    def forward(self, tokens):
        return self.lin(torch.tanh(self.table(tokens) + self.table(tokens.T).transpose(0, 1)))


@pytest.mark.parametrize("t, ghost", [(4, True), (6, False)])
def test_embedding_ghost_and_materialized_with_padding_and_two_lookups(t, ghost):
    """Two lookups concatenate their positions (2T): ghost form when V d >= (2T)^2 (7 * 30 >= 64; 7 * 3 < 144)."""
    torch.manual_seed(0)
    model = Embed(vocab=7, d=30 if ghost else 3)
    tokens = torch.randint(0, 7, (3, t), generator=torch.Generator().manual_seed(0))
    tokens[1, -2:] = 0  # padding lookups: no gradient to row 0
    tokens[2, :2] = 5  # a row looked up twice by one example

    def loss(tokens, w):
        out = model(tokens)
        return (out.pow(2).sum((1, 2)) + out.sum((1, 2))) * w

    w = torch.ones(3)
    result = assert_norms_match(model, loss, (tokens, w))
    assert result.pieces["table.weight"][0].ghost is ghost and result.kinds["table.weight"] == (
        f"Embedding weight, {'ghost form' if ghost else 'materialized'}")
    w[1] = float("nan")  # a dropped example, left out of the clipped sum
    for units in (None, 1):  # one unit per example; one unit of all three (its norm is the sum's)
        summed = loss if units is None else (lambda *t: loss(*t).sum())  # noqa: E731
        grads, _, _ = clipped_sum(model, summed, (tokens, w if units is None else torch.ones(3)), 0.5,
                                  num_units=units)
        expected, _ = accumulator_reference(model, summed, (tokens, w if units is None else torch.ones(3)), 0.5,
                                            "sum", units)
        assert_grads_close(grads, expected)


def test_embedding_scaled_by_batch_frequencies_falls_back():
    """scale_grad_by_freq divides by counts over the whole batch: no per-example rule (nor for max_norm)."""
    torch.manual_seed(0)
    model = Embed()
    model.table.scale_grad_by_freq = True
    tokens = torch.randint(0, 7, (3, 4), generator=torch.Generator().manual_seed(0))
    result = assert_norms_match(model, lambda tk: model(tk).pow(2).sum((1, 2)), (tokens,),
                                expect_fallback=["table.weight"])
    assert result.kinds["table.weight"] == "fallback to vmap: embedding with max_norm or scale_grad_by_freq"


class BiasAndShared(torch.nn.Module):
    """RelPosMHAXL's patterns: a broadcast parameter bias and a Linear on an input shared by all examples."""

    def __init__(self, d=6, heads=2):
        super().__init__()
        self.heads = heads
        self.bias_u = torch.nn.Parameter(torch.randn(d // heads, heads))
        self.linear_pos = torch.nn.Linear(d, d, bias=False)
        self.pos = torch.randn(1, 7, d)

    def forward(self, x):
        n, t, d = x.shape
        q = (x.view(n, t, self.heads, d // self.heads) + self.bias_u.view(1, 1, self.heads, d // self.heads))
        p = self.linear_pos(self.pos).view(1, -1, self.heads, d // self.heads)
        return torch.matmul(q.transpose(1, 2), p.permute(0, 2, 3, 1))  # [N, H, T, 7]


def test_broadcast_bias_and_shared_input_linear():
    torch.manual_seed(0)
    model = BiasAndShared()
    assert_norms_match(model, square_loss(model), seq_batch())


def test_weighted_sum_by_rows_on_a_shared_input_linear_drops_a_unit():
    """One row of weights per parameter ([G, K], rows[p]), the shared-input Linear summed as (sum_k w_k g_k)^T a,
    the plain per-unit pieces summed in one product: each parameter's sum_k w_k grad_k by vmap, unit 2 left out."""
    torch.manual_seed(0)
    model = BiasAndShared()
    x, w = seq_batch()
    loss = square_loss(model)
    result = ghost_pass(model, loss, (x, w))
    grads = vmap_reference(model, loss, (x, w))
    weights = torch.tensor([[0.5, -1.0, 7.0, 2.0], [1.5, 0.25, -3.0, 1.0]], dtype=torch.float64)
    keep = torch.tensor([True, True, False, True])
    rows = [1, 0]  # bias_u, linear_pos.weight
    got = result.weighted_sum(weights, keep, [g.shape[1:] for g in grads], rows=rows)
    for g, row, total in zip(grads, rows, got):
        expected = torch.einsum("k,k...->...", (weights[row] * keep).to(g.dtype), g)
        assert torch.allclose(total, expected, rtol=RTOL, atol=1e-6), float((total - expected).abs().max())
    with pytest.raises(ValueError, match="one row index per parameter"):
        result.weighted_sum(weights, keep, [g.shape[1:] for g in grads], rows=[0])


def test_shared_weights_take_the_norm_of_the_sum(caplog):
    torch.manual_seed(0)

    class Twice(torch.nn.Module):  # one module called twice (registered once: see the note on functional_call)
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 6)

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    model = Twice()
    for t in (2, 9):  # ghost and materialized forms on the concatenated uses
        assert_norms_match(model, square_loss(model), seq_batch(t=t))

    class Mixed(torch.nn.Module):  # the same weight in a Linear and in a plain product
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 6)

        def forward(self, x):
            return self.lin(x) * self.lin.weight.sum(0)

    model = Mixed()
    with caplog.at_level(logging.WARNING, logger="privasr.ghost"):
        assert_norms_match(model, square_loss(model), seq_batch(), expect_fallback=["lin.weight"])
    assert "lin.weight" in caplog.text and "fall back" in caplog.text


def test_uncovered_parameter_falls_back_to_exact_vmap_gradients():
    torch.manual_seed(0)

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 6)
            self.scale = torch.nn.Parameter(torch.rand(6) + 0.5)

        def forward(self, x):
            return torch.tanh(self.lin(x)) * self.scale  # an elementwise product: no rule

    model = Scaled()
    assert_norms_match(model, square_loss(model), seq_batch(), expect_fallback=["scale"])


# -- the Conformer-CTC ------------------------------------------------------------------------------
def tiny_ctc():
    torch.manual_seed(0)
    return build_model("tiny", 12, dropout=0.0).eval()


def ctc_batch(model, seed=0):
    """Features of 3 utterances of unequal lengths (padded) and transcripts of unequal lengths."""
    g = torch.Generator().manual_seed(seed)
    wavs = torch.randn(3, 6000, generator=g)
    wav_lens = torch.tensor([1.0, 0.55, 0.8])
    wavs = wavs * (torch.arange(6000) < (wav_lens[:, None] * 6000).round())  # silence in the padding
    feats, feat_lens = model.features(wavs, wav_lens)
    tokens = torch.randint(1, 12, (3, 5), generator=g)
    return feats, feat_lens, tokens, torch.tensor([1.0, 0.6, 0.8])


def ctc_example_losses(model):
    """Per-example losses [N] equal to the recipe's shard loss of each example alone (loss_reduction mean)."""
    def loss(feats, feat_lens, tokens, token_lens):
        out, out_lens = model.forward_features(feats, feat_lens)
        return model.loss(out, out_lens, tokens, token_lens, reduction="none") / (
            (token_lens * tokens.shape[1]).round().clamp(min=1))
    return loss


def ctc_summed_loss(model):
    """The recipe's shard loss (mean over examples) summed over examples, as PrivateBrain would pass it."""
    def shard_loss(feats, feat_lens, tokens, token_lens):
        out, out_lens = model.forward_features(feats, feat_lens)
        return model.loss(out, out_lens, tokens, token_lens, reduction="mean")
    return summed_shard_loss(shard_loss, 1, "mean")


def test_conformer_ctc_padded_batch_nothing_falls_back():
    model = tiny_ctc()
    tensors = ctc_batch(model)
    result = assert_norms_match(model, ctc_summed_loss(model), tensors)
    assert result.losses.dim() == 0
    # Padding is inert: each utterance's norm is that of the utterance alone, unpadded.
    frames = (tensors[1] * tensors[0].shape[1]).round().long()
    for i in (1, 2):
        alone = (tensors[0][i:i + 1, :frames[i]], torch.ones(1), tensors[2][i:i + 1], tensors[3][i:i + 1])
        single = ghost_pass(model, ctc_summed_loss(model), alone).norms
        assert float(single) == pytest.approx(float(result.norms[i]), rel=1e-4)


def test_conformer_ctc_per_example_losses_and_pcc_cores():
    model = tiny_ctc()
    tensors = ctc_batch(model)
    norms, per_param, losses = per_example_norms(model, ctc_example_losses(model), tensors)
    assert losses.shape == (3,) and set(per_param) == {n for n, _ in trainable_parameters(model)}
    assert torch.allclose(norms, core_norms(vmap_reference(model, ctc_example_losses(model), tensors)), rtol=RTOL)


def test_pcc_cores_of_two_examples():
    torch.manual_seed(0)
    model = SeqModel(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), Transpose(1, 2),
                     torch.nn.Conv1d(5, 5, 3, padding=1, groups=5))
    loss = square_loss(model)
    assert_norms_match(model, lambda *t: loss(*t).sum(), seq_batch(), num_units=2)


# -- the clipped sum --------------------------------------------------------------------------------
def accumulator_reference(model, loss_fn, tensors, bound, reduction, num_units=None):
    params = [p for _, p in trainable_parameters(model)]
    acc = CoreAccumulator(params, "pcc", bound, reduction)
    acc.add_cores(vmap_reference(model, loss_fn, tensors, num_units))
    return acc.reduce()


def assert_grads_close(got, expected):
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, rtol=RTOL, atol=1e-6 * float(e.abs().max()) + 1e-9), float((g - e).abs().max())


@pytest.mark.parametrize("route", ["bookkeeping", "backward"])
def test_clipped_sum_equals_vmap_and_core_accumulator_on_the_conformer(route):
    model = tiny_ctc()
    tensors = ctc_batch(model)
    loss = ctc_example_losses(model)
    bound = float(ghost_pass(model, loss, tensors).norms.median())  # the largest norm clipped, the others not
    grads, norms, factors = clipped_sum(model, loss, tensors, bound, route=route)
    expected, stats = accumulator_reference(model, loss, tensors, bound, "sum")
    assert torch.allclose(norms, stats.core_norms, rtol=RTOL) and torch.allclose(factors, stats.factors, rtol=RTOL)
    assert 0 < int((factors < 1).sum()) < 3
    assert_grads_close(grads, expected)


def test_accumulate_into_core_accumulator_mean_reduction_and_cores():
    torch.manual_seed(0)
    model = SeqModel(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5))
    loss = square_loss(model)
    tensors = seq_batch()
    for units in (None, 2):
        summed = lambda *t: loss(*t).sum()  # noqa: E731
        acc = CoreAccumulator([p for _, p in trainable_parameters(model)], "pcc", 1.0, "mean")
        accumulate(acc, model, summed, tensors, units)
        got, stats = acc.reduce()
        expected, ref_stats = accumulator_reference(model, summed, tensors, 1.0, "mean", units)
        assert_grads_close(got, expected)
        assert torch.allclose(stats.core_norms, ref_stats.core_norms, rtol=RTOL)


@pytest.mark.parametrize("route", ["bookkeeping", "backward"])
def test_zero_norm_and_nan_examples_follow_clip_factors(route):
    torch.manual_seed(0)
    model = SeqModel(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x, w = seq_batch()
    x[1] = float("nan")
    w[2] = 0.0
    inner = square_loss(model)

    def loss(x, w):  # example 2 (w = 0) has a loss that does not depend on the model: zero gradient
        return inner(x, w) * (w > 0).to(x.dtype)

    grads, norms, factors = clipped_sum(model, loss, (x, w), 0.1, route=route)
    assert math.isnan(float(norms[1])) and float(norms[2]) == 0.0
    assert torch.equal(factors, clip_factors(norms, "pcc", 0.1)[0])
    assert float(factors[1]) == 0.0 and float(factors[2]) == 1.0
    expected, stats = accumulator_reference(model, loss, (x, w), 0.1, "sum")
    assert stats.dropped == [1]
    assert all(torch.isfinite(g).all() for g in grads)
    assert_grads_close(grads, expected)


def test_bound_above_every_norm_gives_the_plain_sum():
    torch.manual_seed(0)
    model = SeqModel(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2))
    loss = square_loss(model)
    tensors = seq_batch()
    grads, norms, factors = clipped_sum(model, loss, tensors, 1e6)
    assert torch.equal(factors, torch.ones(4, dtype=torch.float64))
    plain = torch.autograd.grad(loss(*tensors).sum(), [p for _, p in trainable_parameters(model)])
    assert_grads_close(grads, plain)


def test_bad_input_is_refused_with_a_clear_error():
    torch.manual_seed(0)
    model = SeqModel(torch.nn.Linear(6, 5))
    tensors = seq_batch()
    with pytest.raises(ValueError, match="per-example losses"):
        ghost_pass(model, lambda x, w: model(x).sum((1, 2))[:2], tensors)
    with pytest.raises(ValueError, match="num_units must divide"):
        ghost_pass(model, square_loss(model), tensors, num_units=3)
    with pytest.raises(ValueError, match="unknown route"):
        clipped_sum(model, square_loss(model), tensors, 1.0, route="magic")

    def in_place(x, w):
        out = model(x)
        out.mul_(2.0)
        return out.sum((1, 2))

    with pytest.raises(RuntimeError, match="modified in place"):
        ghost_pass(model, in_place, tensors)


# -- privasr-bench-ghost ----------------------------------------------------------------------------------
def test_bench_ghost_cells_run_and_bad_input_is_one_line(capsys):
    """The benchmark's cells run the real step (tiny model, 2 utterances); bad input: one line, status 2."""
    from privasr.cli.bench_ghost import main, markdown, run_cell

    rows = [run_cell(mode, "tiny", 2, 0.3, 1, 0) for mode in ("none", "loop", "ghost")]
    assert [r["mode"] for r in rows] == ["none", "loop", "ghost"] and all(r["time_s"] > 0 for r in rows)
    assert markdown(rows).count("\n") == 4
    assert main(["--repeats", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["privasr-bench-ghost: error: argument --repeats: expected an integer >= 1, got 0 (see --help)"], err


# -- what a pass holds (counted, not timed) --------------------------------------------------------------
def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views counted once)."""
    seen = {}
    for t in tensors:
        if t is not None:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _held(result):
    """``(output gradients, recorded inputs, per-unit gradients)`` that a GhostPass keeps for the clipped sum."""
    grads, inputs, per_unit = [], [], []
    for parts in result.pieces.values():
        for p in parts:
            if isinstance(p, (_Seq, _Conv)):
                grads.append(p.g)
                inputs.append(p.a if isinstance(p, _Seq) else p.x)
                per_unit.append(p._grads)
            else:
                per_unit.append(p)
    return grads, inputs, per_unit


def test_a_pass_holds_only_its_records_and_the_memory_estimate_counts_them():
    """After a pass, the live tensor bytes it allocated are exactly the storages its result keeps; the
    output gradients kept are those of the ghost-form layers only (a materialized layer's is freed once its
    per-example gradient exists), which is what privasr.dp.memory estimates, byte for byte."""
    from privasr.cli.bench_ghost import tensor_bytes
    from privasr.dp.memory import estimate, trace_layers

    model = tiny_ctc()
    tensors = ctc_batch(model)
    loss = ctc_summed_loss(model)
    for keep in (False, True):  # book-keeping last: its records are checked against the estimate below
        ghost_pass(model, loss, tensors, keep_pieces=keep)  # warm-up: lazily built kernels allocate once
        _, net, result = tensor_bytes(lambda: ghost_pass(model, loss, tensors, keep_pieces=keep))
        grads, inputs, per_unit = _held(result)
        others = list(result.sq_norms.values()) + [result.losses]
        assert net == _storage_bytes(grads + inputs + per_unit + others), (keep, net)
        if not keep:  # norms only: nothing of the records survives the pass
            assert not result.pieces and net == _storage_bytes(others)
    est = estimate(trace_layers(model, lambda: loss(*tensors), 3), model, batch=3, chunk=3)
    assert _storage_bytes(grads) == est.output_grads > 0
    assert _storage_bytes(per_unit) == est.materialized > 0
    kinds = [p.ghost for parts in result.pieces.values() for p in parts
             if isinstance(p, (_Seq, _Conv))]
    assert any(kinds) and not all(kinds)  # both forms are on the tiny Conformer (convolutions materialized)


@pytest.mark.parametrize("keep", [True, False])
def test_the_recorder_frees_each_output_gradient_it_does_not_need(keep, monkeypatch):
    """Counted at every arrival of an output gradient during the backward: norms only, the recorder holds
    none after a layer is done; book-keeping, one per ghost-form layer done so far and none of the others.
    Besides, a materialized convolution whose uses are all in is formed at the next arrival (after its own
    backward): until then its output gradient is held, never more than one layer's at a time."""
    model = tiny_ctc()
    tensors = ctc_batch(model)
    counts = []
    arrive = _Recorder.arrive

    def spy(self, site, grad):
        arrive(self, site, grad)
        ghost_form = sum(1 for parts in self.pieces.values() for p in parts
                         if isinstance(p, (_Seq, _Conv)) and p.ghost)
        deferred = sum(1 for name in self.deferred for p in self.pending[name] if isinstance(p, _Conv))
        counts.append((len(self.held_output_grads()), ghost_form, deferred))

    monkeypatch.setattr(_Recorder, "arrive", spy)
    ghost_pass(model, ctc_summed_loss(model), tensors, keep_pieces=keep)
    assert len(counts) > 40  # every recorded layer of the tiny Conformer arrived
    assert all(deferred <= 1 for _, _, deferred in counts)
    assert sum(deferred for _, _, deferred in counts) == 2 + 2  # the front end's two, the two depthwise
    expected = [(ghost_form if keep else 0) + deferred for _, ghost_form, deferred in counts]
    assert [held for held, _, _ in counts] == expected
    if keep:
        assert 0 < counts[-1][0] < len(counts)


def test_convolutions_in_chunks_of_one_unit_are_exact(monkeypatch):
    """The per-unit convolution gradients formed a unit at a time (the smallest chunk) equal vmap's."""
    monkeypatch.setattr(ghost_pieces, "CONV_CHUNK_BYTES", 1)  # where _Conv.materialize reads it
    torch.manual_seed(0)

    class Front(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(1, 4, 3, stride=2, padding=1)
            self.c2 = torch.nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2)

        def forward(self, x):
            return self.c2(torch.relu(self.c1(x.unsqueeze(1))))

    model = Front()
    loss = square_loss(model)
    tensors = seq_batch(t=9, d=7)
    for units in (None, 2):
        summed = loss if units is None else (lambda *t: loss(*t).sum())  # noqa: E731
        assert_norms_match(model, summed, tensors, num_units=units)
        grads, _, _ = clipped_sum(model, summed, tensors, 0.5, num_units=units)
        expected, _ = accumulator_reference(model, summed, tensors, 0.5, "sum", units)
        assert_grads_close(grads, expected)


def test_writing_a_view_of_a_layer_output_in_place_is_refused():
    torch.manual_seed(0)
    model = SeqModel(torch.nn.Linear(6, 5))
    tensors = seq_batch()

    def in_place_view(x, w):
        out = model(x)
        out[:, 0].zero_()
        return out.sum((1, 2))

    with pytest.raises(RuntimeError, match="modified in place"):
        ghost_pass(model, in_place_view, tensors)


@pytest.mark.parametrize("route", ["bookkeeping", "backward"])
def test_input_gradient_in_chunks_is_exact_on_the_conformer(route, monkeypatch):
    """CONV_CHUNK_BYTES = 1: every convolution whose input needs a gradient forms it one example at a time
    (privasr.ghost.conv.conv_in_chunks; with route="backward" the second backward's weight gradients too):
    norms, factors and the clipped sum equal vmap's on the padded Conformer-CTC batch."""
    import privasr.ghost.conv as ghost_conv

    monkeypatch.setattr(ghost_pieces, "CONV_CHUNK_BYTES", 1)
    calls = []
    backward = ghost_conv._InputGradInChunks.backward
    monkeypatch.setattr(ghost_conv._InputGradInChunks, "backward",
                        staticmethod(lambda ctx, g: calls.append(tuple(t is not None for t in backward(ctx, g)[:3]))
                                     or backward(ctx, g)))
    model = tiny_ctc()
    tensors = ctc_batch(model)
    loss = ctc_example_losses(model)
    bound = float(ghost_pass(model, loss, tensors).norms.median())
    calls.clear()
    grads, norms, factors = clipped_sum(model, loss, tensors, bound, route=route)
    # the front end's second convolution and each block's pointwise and depthwise ones (5); the ghost pass takes
    # their input gradients only, a second backward (route="backward") their weight and bias gradients too
    assert calls == [(True, False, False)] * 5 + ([(True, True, True)] * 5 if route == "backward" else [])
    expected, stats = accumulator_reference(model, loss, tensors, bound, "sum")
    assert torch.allclose(norms, stats.core_norms, rtol=RTOL)
    assert_grads_close(grads, expected)


def test_input_gradient_in_chunks_holds_less_than_the_whole_batchs_kernel():
    """The exact tensor peak of a convolution's input gradient (profiler count): whole batch, torch's CPU kernel
    holds two more input-sized buffers; by chunks of 2 of 8 examples, those are a chunk's. The values are equal."""
    from privasr.cli.bench_ghost import tensor_bytes
    from privasr.ghost.conv import conv_in_chunks

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, 20, 20, generator=g, requires_grad=True)
    weight, bias = torch.randn(16, 16, 3, 3, generator=g), torch.randn(16, generator=g)
    per_example = x[0].numel() * 4
    out = torch.nn.functional.conv2d(x, weight, bias, 2, 1)
    chunked = conv_in_chunks(x, weight, bias, 2, 1, 1, 1, 2 * per_example)
    assert torch.equal(chunked, out)
    grad_out = torch.randn(out.shape, generator=g)
    whole_peak, _, whole = tensor_bytes(lambda: torch.autograd.grad(out, [x], grad_out)[0])
    chunk_peak, _, by_chunks = tensor_bytes(lambda: torch.autograd.grad(chunked, [x], grad_out)[0])
    assert torch.allclose(by_chunks, whole, rtol=1e-6, atol=1e-6)
    assert chunk_peak < whole_peak, (chunk_peak, whole_peak)
    assert conv_in_chunks(x.detach(), weight, bias, 2, 1, 1, 1, 1) is None  # no input gradient: the plain call
    assert conv_in_chunks(x, weight, bias, 2, 1, 1, 1, 8 * per_example) is None  # one chunk: the plain call
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts in the forward: the plain call
        assert conv_in_chunks(x, weight, bias, 2, 1, 1, 1, 2 * per_example) is None
