"""Speed-ups that must keep results exact: trimmed cores give the gradients of untrimmed ones."""
import pytest
import torch

from privasr.asr import ASRBrain
from privasr.models import ConformerCTC, ConformerTransducer
from privasr.per_sample import shard_grads_loop

TINY = dict(d_model=32, num_layers=2, nhead=4, d_ffn=64, kernel_size=7, dropout=0.0)
LENGTHS = [8000, 2400, 6400, 3290, 1600, 5120]  # samples; sorted so that every core of 2 has its own length
TOKENS = torch.tensor([[1, 2, 3, 4, 5], [5, 6, 0, 0, 0], [7, 8, 9, 0, 0], [1, 1, 0, 0, 0], [3, 0, 0, 0, 0],
                       [2, 4, 6, 8, 0]])


def batch(model):
    gen = torch.Generator().manual_seed(0)
    wavs = torch.zeros(len(LENGTHS), max(LENGTHS))
    for i, n in enumerate(LENGTHS):
        wavs[i, :n] = 0.1 * torch.randn(n, generator=gen)
    wav_lens = torch.tensor([n / max(LENGTHS) for n in LENGTHS])
    token_lens = (TOKENS != 0).sum(1).float() / TOKENS.shape[1]
    feats, feat_lens = model.features(wavs, wav_lens)
    return feats, feat_lens, TOKENS, token_lens


@pytest.mark.parametrize("kind", ["ctc", "transducer"])
@pytest.mark.parametrize("num_shards", [2, 3, 6])
def test_trimmed_cores_have_the_untrimmed_gradients(kind, num_shards):
    torch.manual_seed(0)
    model = (ConformerCTC(vocab_size=10, **TINY) if kind == "ctc"
             else ConformerTransducer(vocab_size=10, pred_dim=16, **TINY)).eval()

    def loss(feats, feat_lens, tokens, token_lens):
        args = (feats, feat_lens, tokens) if kind == "transducer" else (feats, feat_lens)
        out, out_lens = model.forward_features(*args)
        return model.loss(out, out_lens, tokens, token_lens, reduction="mean")

    tensors = batch(model)
    full = list(shard_grads_loop(model, loss, tensors, num_shards))
    trimmed_widths = []

    def trim(*shard):
        cut = ASRBrain.trim_shard(None, *shard)
        trimmed_widths.append(cut[0].shape[1])
        return cut

    trimmed = list(shard_grads_loop(model, loss, tensors, num_shards, trim))
    assert min(trimmed_widths) < tensors[0].shape[1]  # some core really is shorter than the batch
    for (g_full, l_full), (g_cut, l_cut) in zip(full, trimmed):
        assert torch.allclose(l_full, l_cut, rtol=1e-5, atol=1e-6)
        for a, b in zip(g_full, g_cut):
            if a is None:
                assert b is None
                continue
            # fp32 summation order differs with the width: the test_models tolerance (1e-4 of the largest entry)
            assert (a - b).abs().max() <= 1e-4 * a.abs().max().clamp(min=1e-8), (a - b).abs().max()


def test_trim_keeps_absolute_lengths():
    feats = torch.zeros(2, 10, 3)
    feat_lens = torch.tensor([0.6, 0.4])  # 6 and 4 frames of 10
    tokens = torch.tensor([[1, 2, 0, 0], [3, 0, 0, 0]])
    token_lens = torch.tensor([0.5, 0.25])
    f, fl, t, tl = ASRBrain.trim_shard(None, feats, feat_lens, tokens, token_lens)
    assert f.shape == (2, 6, 3) and t.shape == (2, 2)
    assert torch.equal(torch.round(fl * 6).long(), torch.tensor([6, 4]))
    assert torch.equal(torch.round(tl * 2).long(), torch.tensor([2, 1]))


# -- duration-bucketed batches ----------------------------------------------------------------
from privasr.sampling import DurationBucketSampler  # noqa: E402


def durations(n=96, seed=0):
    return (torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 9 + 1).tolist()


def batches_of(sampler, size):
    order = list(sampler)
    return [order[i:i + size] for i in range(0, len(order), size)]


def padded_frames(batches, lengths):
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def test_every_epoch_is_a_permutation_in_full_batches_reproducible_by_seed_and_epoch():
    lengths = durations()
    sampler = DurationBucketSampler(lengths, batch_size=8, bucket_batches=4, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(96)) and list(sampler) == first  # same (seed, epoch): same order
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(96))
    again = DurationBucketSampler(lengths, batch_size=8, bucket_batches=4, seed=3)
    again.set_epoch(1)
    assert list(again) == list(sampler)  # resume: a new sampler of the same epoch gives the same order


def test_buckets_cut_padding_and_one_batch_windows_are_random_batches():
    lengths = durations()
    random_batches = batches_of(DurationBucketSampler(lengths, 8, bucket_batches=1, seed=0), 8)
    bucketed = batches_of(DurationBucketSampler(lengths, 8, bucket_batches=12, seed=0), 8)
    assert padded_frames(bucketed, lengths) < 0.8 * padded_frames(random_batches, lengths)
    # one-batch windows: each batch is a chunk of one random permutation (only its order changes)
    gen = torch.Generator().manual_seed(0)
    permutation = torch.randperm(96, generator=gen).tolist()
    chunks = {frozenset(permutation[i:i + 8]) for i in range(0, 96, 8)}
    assert {frozenset(b) for b in random_batches} == chunks


def test_examples_land_on_random_cores_within_a_batch():
    """The order inside a batch (hence which core an example lands on) is shuffled, not sorted by duration."""
    lengths = durations(n=480)
    order = list(DurationBucketSampler(lengths, 16, bucket_batches=30, seed=1))
    sorted_inside = sum(all(lengths[a] <= lengths[b] for a, b in zip(batch, batch[1:]))
                        for batch in (order[i:i + 16] for i in range(0, 480, 16)))
    assert sorted_inside == 0


def test_global_batches_span_every_rank():
    """World size 2: rank r takes every 2nd index (DistributedSamplerWrapper); both ranks' batches share a window."""
    lengths = durations(n=64)
    order = list(DurationBucketSampler(lengths, batch_size=4, bucket_batches=8, seed=0, world_size=2))
    for start in range(0, 64, 8):
        global_batch = order[start:start + 8]
        rank0, rank1 = global_batch[0::2], global_batch[1::2]
        assert len(rank0) == len(rank1) == 4
    with pytest.raises(ValueError, match="must be >= 1"):
        DurationBucketSampler(lengths, batch_size=0)
