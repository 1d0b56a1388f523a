"""Tests for privasr.models: shapes, padding exactness, per-example gradients
under vmap, losses (native vs. pure-torch), sizes and parameter counts."""

import math

import pytest
import torch
from torch.func import functional_call, grad, vmap

from privasr.models import (
    PUBLISHED_PARAMS,
    ConformerCTC,
    ConformerTransducer,
    build_model,
    build_spec_augment,
    count_parameters,
    ctc_loss,
    get_size,
    rnnt_loss,
)

TINY = dict(d_model=32, num_layers=2, nhead=4, d_ffn=64, kernel_size=7, dropout=0.0)
LENGTHS = [8000, 5600, 3290]  # samples at 16 kHz; the last is not a multiple of the hop
TOKENS = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0], [7, 0, 0, 0]])
TOKEN_LENS = torch.tensor([1.0, 0.5, 0.25])


def _batch():
    """A zero-padded batch of three waveforms and their relative lengths."""
    gen = torch.Generator().manual_seed(0)
    wavs = torch.zeros(len(LENGTHS), max(LENGTHS))
    for i, n in enumerate(LENGTHS):
        wavs[i, :n] = 0.1 * torch.randn(n, generator=gen)
    return wavs, torch.tensor([n / max(LENGTHS) for n in LENGTHS])


def _unpadded(i):
    """Example ``i`` alone: waveform, rel length 1, its tokens, rel length 1."""
    wavs, _ = _batch()
    n_tokens = int(round(TOKEN_LENS[i].item() * TOKENS.shape[1]))
    return wavs[i, :LENGTHS[i]], torch.tensor(1.0), TOKENS[i, :n_tokens], torch.tensor(1.0)


@pytest.fixture(scope="module")
def ctc_model():
    torch.manual_seed(0)
    return ConformerCTC(vocab_size=10, **TINY).eval()


@pytest.fixture(scope="module")
def transducer_model():
    torch.manual_seed(0)
    return ConformerTransducer(vocab_size=10, pred_dim=16, **TINY).eval()


def _assert_per_example_grads_match(model, loss_of_one):
    """vmap(grad) over the padded batch == grad of each unpadded example."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    wavs, wav_lens = _batch()
    batched = vmap(grad(loss_of_one), in_dims=(None, 0, 0, 0, 0))(
        params, wavs, wav_lens, TOKENS, TOKEN_LENS)
    for i in range(len(LENGTHS)):
        single = grad(loss_of_one)(params, *_unpadded(i))
        for name, g in single.items():
            scale = g.abs().max().clamp(min=1e-8)
            err = (batched[name][i] - g).abs().max() / scale
            assert err < 1e-4, f"example {i}, {name}: relative error {err:.2e}"


# --------------------------------------------------------------------- forward
def test_ctc_forward_shapes_and_lengths(ctc_model):
    wavs, wav_lens = _batch()
    log_probs, out_lens = ctc_model(wavs, wav_lens)
    frames = max(LENGTHS) // 160 + 1
    assert log_probs.shape == (3, math.ceil(math.ceil(frames / 2) / 2), 10)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(log_probs.shape[:2]), atol=1e-5)
    assert out_lens[0] == 1.0 and torch.all(out_lens <= 1.0)


def test_padded_batch_equals_unpadded_forward(ctc_model):
    wavs, wav_lens = _batch()
    log_probs, out_lens = ctc_model(wavs, wav_lens)
    for i in range(3):
        single, _ = ctc_model(_unpadded(i)[0][None], torch.ones(1))
        n = single.shape[1]
        assert round(out_lens[i].item() * log_probs.shape[1]) == n
        torch.testing.assert_close(log_probs[i, :n], single[0], atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def ctc_model_20ms():
    torch.manual_seed(0)
    return ConformerCTC(vocab_size=10, subsampling_factor=2, **TINY).eval()


def test_subsampling_factor_2_gives_20ms_frames_exact_under_padding(ctc_model_20ms):
    """Factor 2: ceil(frames / 2) outputs (twice factor 4's), and padding still leaves valid frames unchanged."""
    wavs, wav_lens = _batch()
    log_probs, out_lens = ctc_model_20ms(wavs, wav_lens)
    assert log_probs.shape == (3, math.ceil((max(LENGTHS) // 160 + 1) / 2), 10)
    for i in range(3):
        single, _ = ctc_model_20ms(_unpadded(i)[0][None], torch.ones(1))
        n = single.shape[1]
        assert n == math.ceil((LENGTHS[i] // 160 + 1) / 2)
        assert round(out_lens[i].item() * log_probs.shape[1]) == n
        torch.testing.assert_close(log_probs[i, :n], single[0], atol=1e-5, rtol=1e-4)


def test_subsampling_factor_2_vmap_per_example_grads_equal_unpadded_loop(ctc_model_20ms):
    def loss_of_one(params, wav, wav_len, tokens, token_len):
        log_probs, out_lens = functional_call(ctc_model_20ms, params, (wav[None], wav_len[None]))
        return ctc_model_20ms.loss(log_probs, out_lens, tokens[None], token_len[None], reduction="sum")

    _assert_per_example_grads_match(ctc_model_20ms, loss_of_one)


def test_no_batchnorm_anywhere(ctc_model, transducer_model):
    for model in (ctc_model, transducer_model):
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


# -------------------------------------------------------- per-example gradients
def test_ctc_vmap_per_example_grads_equal_unpadded_loop(ctc_model):
    def loss_of_one(params, wav, wav_len, tokens, token_len):
        log_probs, out_lens = functional_call(ctc_model, params, (wav[None], wav_len[None]))
        return ctc_model.loss(log_probs, out_lens, tokens[None], token_len[None], reduction="sum")

    _assert_per_example_grads_match(ctc_model, loss_of_one)


def test_transducer_vmap_per_example_grads_equal_unpadded_loop(transducer_model):
    def loss_of_one(params, wav, wav_len, tokens, token_len):
        logits, out_lens = functional_call(transducer_model, params,
                                           (wav[None], wav_len[None], tokens[None]))
        return transducer_model.loss(logits, out_lens, tokens[None], token_len[None], "sum")

    _assert_per_example_grads_match(transducer_model, loss_of_one)


def test_vmap_runs_in_train_mode_with_dropout():
    torch.manual_seed(0)
    model = ConformerCTC(vocab_size=10, **{**TINY, "dropout": 0.1}).train()
    params = {k: v.detach() for k, v in model.named_parameters()}
    wavs, wav_lens = _batch()

    def loss_of_one(p, wav, wav_len, tokens, token_len):
        log_probs, out_lens = functional_call(model, p, (wav[None], wav_len[None]))
        return model.loss(log_probs, out_lens, tokens[None], token_len[None])

    grads = vmap(grad(loss_of_one), in_dims=(None, 0, 0, 0, 0), randomness="different")(
        params, wavs, wav_lens, TOKENS, TOKEN_LENS)
    assert all(torch.isfinite(g).all() for g in grads.values())


# ----------------------------------------------------------------------- losses
def _random_ctc_case():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 9, 6, generator=gen, requires_grad=True)
    tokens = torch.tensor([[1, 2, 3, 4], [1, 1, 0, 0], [3, 4, 5, 0], [2, 0, 0, 0]])
    token_lens = torch.tensor([1.0, 0.5, 0.75, 0.25])
    out_lens = torch.tensor([1.0, 6 / 9, 1 / 9, 4 / 9])  # example 2 cannot align (1 frame, 3 labels)
    return logits, out_lens, tokens, token_lens


def test_ctc_reductions_and_infinite_counting():
    logits, out_lens, tokens, token_lens = _random_ctc_case()
    log_probs = logits.log_softmax(-1)
    per_utt = ctc_loss(log_probs, out_lens, tokens, token_lens, reduction="none")
    # only the utterance that cannot align (1 frame, 3 labels) is infinite, and it is not zeroed
    assert torch.isinf(per_utt).tolist() == [False, False, True, False] and math.isinf(per_utt[2].item())
    finite = torch.where(torch.isfinite(per_utt), per_utt, torch.zeros_like(per_utt))
    total = ctc_loss(log_probs, out_lens, tokens, token_lens, reduction="sum")
    torch.testing.assert_close(total, finite.sum())
    mean = ctc_loss(log_probs, out_lens, tokens, token_lens, reduction="mean")
    torch.testing.assert_close(mean, (finite / torch.tensor([4.0, 2.0, 3.0, 1.0])).mean())
    g, = torch.autograd.grad(total, logits)
    assert torch.isfinite(g).all() and g[2].abs().max() == 0
    with pytest.raises(ValueError, match="reduction"):
        ctc_loss(log_probs, out_lens, tokens, token_lens, reduction="avg")


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_ctc_pure_torch_equals_native(reduction):
    logits, out_lens, tokens, token_lens = _random_ctc_case()
    native = ctc_loss(logits.log_softmax(-1), out_lens, tokens, token_lens, reduction,
                      implementation="native")
    ours = ctc_loss(logits.log_softmax(-1), out_lens, tokens, token_lens, reduction,
                    implementation="torch")
    torch.testing.assert_close(ours, native)
    if reduction != "none":  # grads w.r.t. logits (native's grad w.r.t. log_probs is shifted)
        g_native, = torch.autograd.grad(native, logits)
        g_ours, = torch.autograd.grad(ours, logits)
        torch.testing.assert_close(g_ours, g_native, atol=1e-5, rtol=1e-4)


def test_rnnt_pure_torch_equals_torchaudio():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 7, 5, 6, generator=gen, requires_grad=True)
    tokens = torch.randint(1, 6, (3, 4), generator=gen)
    out_lens, token_lens = torch.tensor([1.0, 6 / 7, 3 / 7]), torch.tensor([1.0, 0.5, 0.25])
    native = rnnt_loss(logits, out_lens, tokens, token_lens, "none", implementation="native")
    ours = rnnt_loss(logits, out_lens, tokens, token_lens, "none", implementation="torch")
    torch.testing.assert_close(ours, native)
    g_native, = torch.autograd.grad(native.sum(), logits)
    g_ours, = torch.autograd.grad(ours.sum(), logits)
    torch.testing.assert_close(g_ours, g_native, atol=1e-5, rtol=1e-4)
    mean = rnnt_loss(logits, out_lens, tokens, token_lens, "mean")
    torch.testing.assert_close(mean, (native / torch.tensor([4.0, 2.0, 1.0])).mean())


# ------------------------------------------------------------------- transducer
def test_transducer_shapes_and_greedy_decode(transducer_model):
    wavs, wav_lens = _batch()
    logits, out_lens = transducer_model(wavs, wav_lens, TOKENS)
    assert logits.shape[0] == 3 and logits.shape[2:] == (5, 10)
    hyps = transducer_model.greedy_decode(wavs, wav_lens, max_symbols_per_frame=2)
    frames = [round(r * logits.shape[1]) for r in out_lens.tolist()]
    assert len(hyps) == 3
    for hyp, n in zip(hyps, frames):
        assert len(hyp) <= 2 * n and all(1 <= t < 10 for t in hyp)


def test_transducer_greedy_emits_nothing_when_blank_dominates(transducer_model):
    model = ConformerTransducer(vocab_size=10, pred_dim=16, **TINY).eval()
    with torch.no_grad():
        model.joint.out.bias.fill_(-1e4)
        model.joint.out.bias[0] = 1e4
    wavs, wav_lens = _batch()
    assert model.greedy_decode(wavs, wav_lens) == [[], [], []]


# ----------------------------------------------------------- augment and groups
def test_spec_augment_train_only_and_padding_stays_zero():
    torch.manual_seed(0)
    model = ConformerCTC(vocab_size=10, spec_augment=build_spec_augment(
        time_warp=0, freq_masks=2, freq_width=10, time_masks=2, time_width=5), **TINY)
    feats, feat_lens = model.features(*_batch())
    assert torch.equal(model.eval().augment(feats, feat_lens), feats)
    augmented = model.train().augment(feats, feat_lens)
    assert not torch.equal(augmented, feats)
    n_valid = round(feat_lens[2].item() * feats.shape[1])
    assert augmented[2, n_valid:].abs().max() == 0


def test_param_groups_partition_parameters(ctc_model, transducer_model):
    for model, tail in ((ctc_model, ["ctc_head"]), (transducer_model, ["predictor", "joint"])):
        groups = model.param_groups()
        assert list(groups) == ["frontend", "layer.0", "layer.1", "final_norm"] + tail
        names = [n for members in groups.values() for n in members]
        assert sorted(names) == sorted(n for n, _ in model.named_parameters())
        paths = ["encoder.subsampling", "encoder.conformer.layers.0", "encoder.conformer.layers.1",
                 "encoder.conformer.norm"] + tail
        for members, path in zip(groups.values(), paths):  # each group: exactly its module's parameters
            assert members == [f"{path}.{n}" for n, _ in model.get_submodule(path).named_parameters()], path


# ------------------------------------------------------------------------ sizes
@pytest.mark.parametrize("size", ["S", "M", "L", "XL"])
def test_published_parameter_counts(size):
    """Transducers with a 1-layer LSTM predictor (320 units for S, 640 otherwise)
    and a 1024-piece vocabulary, counted on the meta device, against
    Gulati et al. 2020 (Conformer S 10.3 M, M 30.7 M, L 118.8 M) and
    Zhang et al. 2020, "Pushing the limits of semi-supervised learning for
    ASR" (Conformer XL 0.6 B, the encoder of BEST-RQ / the PCC paper): +-15 %."""
    with torch.device("meta"):
        model = build_model(size, vocab_size=1024, kind="transducer")
    count = count_parameters(model)
    assert abs(count / PUBLISHED_PARAMS[size] - 1) < 0.15, f"{size}: {count / 1e6:.1f} M"


def test_mini_fits_two_cpu_cores():
    with torch.device("meta"):
        model = build_model("mini", vocab_size=256)
    assert 1e6 <= count_parameters(model) <= 3e6


def test_build_model_from_dict_and_overrides():
    model = build_model({**get_size("tiny"), "num_layers": 1}, vocab_size=12, dropout=0.0)
    assert isinstance(model, ConformerCTC) and len(model.encoder.conformer.layers) == 1
    assert isinstance(build_model("tiny", 12, kind="transducer"), ConformerTransducer)


@pytest.mark.parametrize("kwargs, match", [
    (dict(size_or_dict="XXL"), "unknown model size"),
    (dict(size_or_dict="tiny", kind="las"), "kind"),
    (dict(size_or_dict="tiny", heads=4), "unknown model config keys"),
    (dict(size_or_dict="tiny", kernel_size=32), "odd"),
    (dict(size_or_dict="tiny", nhead=5), "divisible"),
    (dict(size_or_dict="tiny", dropout=1.5), "dropout"),
    (dict(size_or_dict="tiny", vocab_size=1), "vocab_size"),
    (dict(size_or_dict="tiny", subsampling_factor=3), "subsampling_factor must be one of"),
])
def test_bad_config_raises_value_error(kwargs, match):
    kwargs = {"vocab_size": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_model(**kwargs)


def test_rnnt_loss_of_a_shard_padded_beyond_its_longest_utterance():
    """A shard keeps its batch's padding; the native loss must equal the unpadded one."""
    from privasr.models.rnnt_loss import rnnt_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 4, 5)
    tokens = torch.randint(1, 5, (2, 3))
    padded = rnnt_loss(logits, torch.tensor([4 / 6, 3 / 6]), tokens, torch.tensor([2 / 3, 1 / 3]), "none")
    trimmed = rnnt_loss(logits[:, :4, :3], torch.tensor([1.0, 3 / 4]), tokens[:, :2], torch.tensor([1.0, 0.5]), "none")
    assert torch.allclose(padded, trimmed)


def test_ctc_infeasible_counts_frames_against_labels_plus_repeats():
    """CTC needs one frame per label plus one blank between equal neighbours (hand-counted)."""
    from privasr.asr.brain import ctc_infeasible

    tokens = torch.tensor([[3, 3, 4, 0], [5, 6, 7, 8], [2, 2, 2, 0]])
    token_lens = torch.tensor([3, 4, 3])          # needs 3+1, 4+0, 3+2 frames
    frames = torch.tensor([4, 3, 5])
    assert ctc_infeasible(frames, tokens, token_lens).tolist() == [False, True, False]
    assert ctc_infeasible(frames - 1, tokens, token_lens).tolist() == [True, True, True]
    # a repeat in the padding does not count
    assert not ctc_infeasible(torch.tensor([2]), torch.tensor([[1, 2, 9, 9]]), torch.tensor([2])).any()


def test_valid_loss_is_on_the_training_loss_scale():
    """With loss_reduction mean, the per-utterance evaluation loss averaged over a batch equals
    PyTorch's own CTC 'mean' (per target token, then over the batch), the scale training logs."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from privasr.asr.brain import ASRBrain

    torch.manual_seed(0)
    log_probs = torch.randn(3, 12, 6).log_softmax(-1)
    tokens = torch.tensor([[1, 2, 3, 4], [2, 2, 0, 0], [5, 0, 0, 0]])
    token_abs = torch.tensor([4, 2, 1])
    per_utt = F.ctc_loss(log_probs.transpose(0, 1), tokens, torch.full((3,), 12), token_abs, reduction="none")
    batch = SimpleNamespace(tokens=(tokens, token_abs / 4))
    as_mean = ASRBrain.comparable_losses(SimpleNamespace(hparams=SimpleNamespace(loss_reduction="mean")), per_utt, batch)
    reference = F.ctc_loss(log_probs.transpose(0, 1), tokens, torch.full((3,), 12), token_abs, reduction="mean")
    assert torch.allclose(as_mean.mean(), reference)
    as_sum = ASRBrain.comparable_losses(SimpleNamespace(hparams=SimpleNamespace(loss_reduction="sum")), per_utt, batch)
    assert torch.equal(as_sum, per_utt)
