"""The canary-aware core log: the norms and clip scales it records are those of the step, labelled per core."""
import numpy as np
import pytest
import torch

from privasr.core_log import CoreLog, markdown_table, plot_core_logs, read_core_logs, shard_partition, summarize
from privasr.per_sample import split_into_shards

from .test_brain import batches_of, hparams, reference_run
from .toy import fit_toy_brain, make_toy_brain


@pytest.mark.parametrize("n, k", [(8, 4), (7, 3), (5, 5), (3, 1)])
def test_shard_partition_matches_the_tensor_split_of_the_batch(n, k):
    ids = list(range(n))
    shards = split_into_shards([torch.arange(n)], k)
    assert shard_partition(ids, k) == [s[0].tolist() for s in shards]


def labelled_toy_brain(tmp_path, method, bound, cores):
    brain = make_toy_brain(hparams(method, bound, cores, core_log_dir=str(tmp_path)), lr=0.1)
    # label = the index of the first example of each core in the 16-example epoch (batches of 8)
    seen = {"n": 0}

    def shard_labels(batch, num_shards):
        ids = list(range(seen["n"], seen["n"] + batch[0].shape[0]))
        seen["n"] += len(ids)
        return [shard[0] for shard in shard_partition(ids, num_shards)]

    brain.shard_labels = shard_labels
    return brain


@pytest.mark.parametrize("method, bound", [("pcc", 5.0), ("apcc", None), ("none", None)])
def test_logged_norms_and_scales_are_the_steps(method, bound, tmp_path):
    fit_toy_brain(labelled_toy_brain(tmp_path, method, bound, 4), batches_of(8))
    log = read_core_logs(tmp_path)
    assert log["label"].tolist() == [0, 2, 4, 6, 8, 10, 12, 14]
    # reference: the core norms along the same two SGD steps, and the scales each method gives them
    _, per_step = reference_run(method, bound, 4)
    expected_scales = []
    for norms in map(torch.tensor, per_step):
        scales = {"pcc": torch.clamp(bound / norms, max=1.0) if bound else None,
                  "apcc": norms.min() / norms, "none": torch.ones(4)}[method]
        expected_scales += scales.tolist()
    np.testing.assert_allclose(log["norm"], [n for norms in per_step for n in norms], rtol=1e-4)
    np.testing.assert_allclose(log["scale"], expected_scales, rtol=1e-4)


def test_no_log_without_labels_or_directory(tmp_path):
    fit_toy_brain(make_toy_brain(hparams("pcc", 5.0, 4, core_log_dir=str(tmp_path))), batches_of(8))
    assert not list(tmp_path.iterdir())  # the toy brain labels nothing


def test_a_resumed_step_is_counted_once_and_summaries_by_label(tmp_path):
    log = CoreLog(tmp_path, rank=1)
    log.add(1, [1.0, 4.0], [1.0, 0.25], [0, 16])
    log.add(2, [2.0, 8.0], [0.5, 0.125], [0, 16])
    log.add(2, [3.0, 9.0], [1 / 3, 1 / 9], [0, 16])  # step 2 again, after a resume
    CoreLog(tmp_path, rank=0).add(1, [5.0], [0.2], [1])
    got = read_core_logs(tmp_path)
    assert sorted(got["norm"].tolist()) == [1.0, 3.0, 4.0, 5.0, 9.0]
    summary = summarize(got)
    assert summary[0]["n"] == 2 and summary[0]["norm_p50"] == pytest.approx(2.0)
    assert summary[16]["scale_p50"] == pytest.approx((0.25 + 1 / 9) / 2)
    assert summary[1] == {"n": 1, **{f"norm_p{q}": 5.0 for q in (10, 50, 90)},
                          **{f"scale_p{q}": pytest.approx(0.2) for q in (10, 50, 90)}}
    table = markdown_table({"pcc": summary}, labels=(0, 16, 4))
    assert "| pcc | 2 / 0.667 | 6.5 / 0.181 | – |" in table
    png = plot_core_logs({"pcc": got}, tmp_path / "cores.png")
    assert png.stat().st_size > 1000


def test_mismatched_lengths_are_refused(tmp_path):
    with pytest.raises(ValueError, match="one each per core"):
        CoreLog(tmp_path).add(1, [1.0], [1.0, 1.0], [0])


def test_the_table_puts_the_prediction_from_r_next_to_the_measured_scale_ratio():
    summary = {0: {"norm_p50": 2.0, "scale_p50": 0.6}, 1: {"norm_p50": 2.6, "scale_p50": 0.5},
               16: {"norm_p50": 2.4, "scale_p50": 0.4}}
    runs = {"pcc_B2": summary, "baseline": summary}
    plain = markdown_table(runs, labels=(0, 1, 16))
    assert markdown_table(runs, labels=(0, 1, 16), r=None) == plain  # without r: the table as before
    assert plain.splitlines()[2] == "| pcc_B2 | 2 / 0.6 | 2.6 / 0.5 | 2.4 / 0.4 |"

    table = markdown_table(runs, labels=(0, 1, 16), r=1.6, per_core={"pcc_B2": 2}).splitlines()
    assert table[0].endswith("| normal / canary clip scale, measured (x1 / x16) |"
                             " predicted from r, √(r²+B−1)/√B (r = 1.6) |")
    assert table[1] == "|---" * 6 + "|"
    # measured 0.6 / 0.5 = 1.2 and 0.6 / 0.4 = 1.5; predicted sqrt((1.6^2 + 1) / 2) = 1.334; no B: no prediction
    assert table[2] == "| pcc_B2 | 2 / 0.6 | 2.6 / 0.5 | 2.4 / 0.4 | 1.2 / 1.5 | 1.33 |"
    assert table[3] == "| baseline | 2 / 0.6 | 2.6 / 0.5 | 2.4 / 0.4 | 1.2 / 1.5 | – |"

    # r per insertion count: sqrt((2^2 + 3) / 4) = 1.323 for x1; x16 has no r
    by_count = markdown_table({"pcc_B4": summary}, labels=(0, 1, 16), r={1: 2.0}, per_core={"pcc_B4": 4})
    assert by_count.splitlines()[2].endswith("| 1.2 / 1.5 | 1.32 / – |")
