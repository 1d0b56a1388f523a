"""Exposure: hand-computed ranks, scipy's skew-normal, jiwer-consistent error rates, the CLI."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from scipy.stats import skewnorm

from privasr.exposure import (EXTRAPOLATION_CAP_BITS, compare_reports, difference_over_seeds, error_rates,
                              exposure_extrapolation, exposure_interpolation, markdown_table, ranks, score_exposure,
                              summarize_by_insertions, summarize_over_seeds)
from tests.conftest import assert_one_line_error, run_privasr_cli

HOLDOUT = [0.1, 0.2, 0.2, 0.5]


# ------------------------------------------------------------------ ranks and exposure
def test_interpolation_hand_computed_both_tie_rules():
    canary = [0.0, 0.2, 0.6]
    mean_rank, mean_exp = exposure_interpolation(canary, HOLDOUT, ties="mean")
    np.testing.assert_allclose(mean_rank, [1, 1 + 1 + 0.5 * 2, 5])  # [1, 3, 5]
    np.testing.assert_allclose(mean_exp, [2, 2 - math.log2(3), 2 - math.log2(5)])
    ref_rank, ref_exp = exposure_interpolation(canary, HOLDOUT, ties="reference")
    np.testing.assert_allclose(ref_rank, [1, 4, 5])
    np.testing.assert_allclose(ref_exp, [2, 0, 2 - math.log2(5)])


def test_all_tied_at_the_floor_gives_about_one_bit():
    """A model that outputs nothing: CER 1 for every canary and holdout utterance."""
    holdout, canary = np.ones(1000), np.ones(20)
    _, exposure = exposure_interpolation(canary, holdout, ties="mean")
    np.testing.assert_allclose(exposure, math.log2(1000) - math.log2(501))
    assert exposure[0] == pytest.approx(0.997, abs=1e-3)
    rank, exposure = exposure_interpolation(canary, holdout, ties="reference")
    np.testing.assert_allclose(rank, 1001)
    np.testing.assert_allclose(exposure, math.log2(1000 / 1001))


def test_ties_at_the_top():
    holdout = [0.0, 0.0, 0.5, 1.0]
    assert ranks([0.0], holdout, "mean")[0] == 2.0  # 1 + 0 + 2/2
    assert ranks([0.0], holdout, "reference")[0] == 3.0
    assert exposure_interpolation([0.0], holdout, "mean")[1][0] == pytest.approx(1.0)
    assert exposure_interpolation([-1.0], holdout, "mean")[1][0] == pytest.approx(2.0)  # the maximum, log2 |R|


def test_rank_matches_a_brute_force_count():
    rng = np.random.default_rng(0)
    holdout, canary = rng.integers(0, 6, 200) / 5, rng.integers(0, 6, 50) / 5
    brute_mean = [1 + sum(h < c for h in holdout) + 0.5 * sum(h == c for h in holdout) for c in canary]
    brute_ref = [1 + sum(h <= c for h in holdout) for c in canary]
    np.testing.assert_allclose(ranks(canary, holdout, "mean"), brute_mean)
    np.testing.assert_allclose(ranks(canary, holdout, "reference"), brute_ref)


def test_rank_errors():
    with pytest.raises(ValueError, match="empty holdout"):
        ranks([0.1], [])
    with pytest.raises(ValueError, match="ties must be one of"):
        ranks([0.1], [0.2], ties="max")
    with pytest.raises(ValueError, match="NaN"):
        ranks([float("nan")], [0.2])


def test_extrapolation_matches_scipy_skewnorm():
    rng = np.random.default_rng(1)
    holdout = skewnorm.rvs(3.0, loc=0.6, scale=0.2, size=500, random_state=rng)
    canary = np.array([0.2, 0.5, 0.7, 1.2])
    exposure, capped, params = exposure_extrapolation(canary, holdout)
    fit = skewnorm.fit(holdout)
    np.testing.assert_allclose(params, fit)
    np.testing.assert_allclose(exposure, -np.log2(skewnorm.cdf(canary, *fit)), rtol=1e-9)
    assert not capped.any()


def test_extrapolation_underflow_is_capped_and_flagged():
    holdout = np.random.default_rng(2).normal(0.8, 0.05, 300)
    exposure, capped, _ = exposure_extrapolation([-50.0, 0.8], holdout)
    assert skewnorm.cdf(-50.0, *skewnorm.fit(holdout)) == 0.0  # the case being tested
    assert capped.tolist() == [True, False]
    assert exposure[0] == EXTRAPOLATION_CAP_BITS and np.isfinite(exposure).all()


def test_extrapolation_needs_spread():
    with pytest.raises(ValueError, match="not all equal"):
        exposure_extrapolation([0.5], np.ones(100))


def test_summarize_by_insertions_hand_computed():
    summary = summarize_by_insertions([1, 1, 2, 4, 4, 4], [1.0, 3.0, 5.0, 0.0, 3.0, 6.0])
    assert summary == {1: {"mean": 2.0, "std": 1.0, "n": 1 + 1}, 2: {"mean": 5.0, "std": 0.0, "n": 1},
                       4: {"mean": 3.0, "std": pytest.approx(math.sqrt(6.0)), "n": 3}}


def _report(pairs):
    return {"per_canary": [{"insertions": k, "exposure": e} for k, e in pairs]}


def test_summarize_over_seeds_is_the_spread_of_per_seed_means():
    # seed 1: x1 canaries 1, 3 (mean 2); x4: 6.  seed 2: x1 canaries 4, 6 (mean 5); x4: 8.
    summary = summarize_over_seeds([_report([(1, 1.0), (1, 3.0), (4, 6.0)]), _report([(1, 4.0), (1, 6.0), (4, 8.0)])])
    assert summary == {1: {"mean": 3.5, "std": 1.5, "n": 2, "over": "seeds"},
                       4: {"mean": 7.0, "std": 1.0, "n": 2, "over": "seeds"}}
    # pooled over canaries x seeds the x1 std would be sqrt(((1-3.5)^2+(3-3.5)^2+(4-3.5)^2+(6-3.5)^2)/4) = 1.80
    # a count only one seed has: the mean of what there is, n says how many seeds
    partial = summarize_over_seeds([_report([(1, 2.0), (8, 5.0)]), _report([(1, 4.0)])])
    assert partial[8] == {"mean": 5.0, "std": 0.0, "n": 1, "over": "seeds"} and partial[1]["mean"] == 3.0
    one = summarize_over_seeds([_report([(1, 1.0), (1, 3.0)])])
    assert one == {1: {"mean": 2.0, "std": 1.0, "n": 2, "over": "canaries"}}
    with pytest.raises(ValueError, match="no exposure reports"):
        summarize_over_seeds([])


def test_difference_over_seeds_pairs_runs_by_seed():
    # x1: seed 1 run mean 2 vs reference 5 (d = -3); seed 2 run 6 vs reference 5 (d = +1); seed 3 only in the run
    runs = {"1": _report([(1, 1.0), (1, 3.0), (4, 2.0)]), "2": _report([(1, 6.0), (4, 9.0)]), "3": _report([(1, 0.0)])}
    refs = {"1": _report([(1, 5.0), (4, 4.0)]), "2": _report([(1, 4.0), (1, 6.0), (4, 8.0)])}
    diff = difference_over_seeds(runs, refs)
    assert diff == {1: {"mean": -1.0, "std": 2.0, "n": 2, "lower": 1}, 4: {"mean": -0.5, "std": 1.5, "n": 2, "lower": 1}}
    with pytest.raises(ValueError, match="no seed is common"):
        difference_over_seeds({"3": runs["3"]}, refs)


def test_error_rates_hand_computed():
    refs = ["ABCD", "THE CAT SAT ON", "HELLO", "A  B"]
    hyps = ["abxd", "THE CAT", "", " a b "]
    np.testing.assert_allclose(error_rates(refs, hyps, "cer"), [0.25, 7 / 14, 1.0, 0.0])
    np.testing.assert_allclose(error_rates(refs, hyps, "wer"), [1.0, 0.5, 1.0, 0.0])
    with pytest.raises(ValueError, match="'cer' or 'wer'"):
        error_rates(refs, hyps, "ter")


def test_markdown_table_format():
    table = markdown_table({"Baseline": {"1": {"mean": 4.81, "std": 3.66}, "2": {"mean": 11.0, "std": 3.8}},
                            "PCC": {"1": {"mean": 1.0, "std": 0.0}}})
    assert table.splitlines() == ["| Canary #Insertion | 1 | 2 |", "|---|---|---|",
                                  "| Baseline | 4.8 ± 3.7 | 11.0 ± 3.8 |", "| PCC | 1.0 ± 0.0 | – |"]


# ------------------------------------------------------------------ files and CLI
def _manifest(path, rows, insertions=None):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ID", "duration", "wav", "spk_id", "wrd"] + (["insertions"] if insertions else []))
        for i, (utt_id, wrd) in enumerate(rows):
            extra = [insertions[i]] if insertions else []
            writer.writerow([utt_id, "1.0", f"/nowhere/{utt_id}.wav", "v", wrd] + extra)
    return path


def _hyps(path, rows, header=("ID", "hyp", "score")):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def audit(tmp_path):
    """2 canaries (1 and 2 insertions), 4 holdout; hand-picked CERs 0, 0.5 and 0.25, 0.5, 0.5, 1."""
    canaries = _manifest(tmp_path / "canaries.csv", [("canary_0000", "ABCD"), ("canary_0001", "ABCD")], ["1", "2"])
    holdout = _manifest(tmp_path / "holdout.csv", [(f"holdout_{i}", "ABCD") for i in range(4)])
    hyps = _hyps(tmp_path / "hyps.csv", [("canary_0000", "ABCD", "0.1"), ("canary_0001", "ABXY", "3"),
                                         ("holdout_0", "ABCX", "1"), ("holdout_1", "AB", "2"),
                                         ("holdout_2", "XYCD", "2"), ("holdout_3", "", "4")])
    return canaries, holdout, hyps


def test_score_exposure_by_cer_hand_computed(audit):
    report = score_exposure(*audit, metric="cer", method="interpolation", ties="mean")
    assert report["holdout_size"] == 4
    assert (report["metric"], report["method"], report["ties"]) == ("cer", "interpolation", "mean")
    per = {c["id"]: c for c in report["per_canary"]}
    assert per["canary_0000"]["score"] == 0.0 and per["canary_0000"]["rank"] == 1.0
    assert per["canary_0000"]["exposure"] == pytest.approx(2.0)
    assert per["canary_0001"]["rank"] == 1 + 1 + 0.5 * 2  # CER 0.5 ties two holdout utterances
    assert per["canary_0001"]["exposure"] == pytest.approx(2 - math.log2(3))
    assert report["by_insertions"]["2"] == {"mean": pytest.approx(2 - math.log2(3)), "std": 0.0, "n": 1}


def test_score_exposure_by_score_and_extrapolation(audit):
    report = score_exposure(*audit, metric="score", method="extrapolation")
    fit = skewnorm.fit([1.0, 2.0, 2.0, 4.0])  # nearly a half-normal starting at 1: F(0.1) == 0
    first, second = report["per_canary"]
    assert skewnorm.cdf(0.1, *fit) == 0.0
    assert (first["exposure"], first["capped"]) == (EXTRAPOLATION_CAP_BITS, True)
    assert second["exposure"] == pytest.approx(-np.log2(skewnorm.cdf(3.0, *fit)), rel=1e-9)
    assert second["capped"] is False
    assert report["skewnorm_fit"] == pytest.approx(dict(zip(("a", "loc", "scale"), fit)))
    assert [first["rank"], second["rank"]] == [1.0, 1 + 3]  # 3 beats 1, 2, 2 but not 4


def test_cli_scores_plots_and_compares(audit, tmp_path):
    canaries, holdout, hyps = audit
    proc = run_privasr_cli("tools.score_exposure", "--canaries", canaries, "--holdout", holdout, "--hyps", hyps,
                           "--out", tmp_path / "a.json", "--plot", tmp_path / "a.png", "--label", "base")
    assert proc.returncode == 0, proc.stderr
    assert "| base | 2.0 ± 0.0 | 0.4 ± 0.0 |" in proc.stdout
    report = json.loads((tmp_path / "a.json").read_text())
    assert set(report) >= {"holdout_size", "metric", "method", "ties", "per_canary", "by_insertions"}
    assert set(report["per_canary"][0]) >= {"id", "insertions", "score", "rank", "exposure"}
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    proc = run_privasr_cli("tools.score_exposure", "--canaries", canaries, "--holdout", holdout, "--hyps", hyps,
                           "--metric", "score", "--ties", "reference", "--out", tmp_path / "b.json", "--label", "pcc")
    assert proc.returncode == 0, proc.stderr
    proc = run_privasr_cli("tools.score_exposure", "compare", tmp_path / "a.json", tmp_path / "b.json",
                           "--plot", tmp_path / "cmp.png", "--out", tmp_path / "cmp.md")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cmp.md").read_text().splitlines()[2:] == ["| base | 2.0 ± 0.0 | 0.4 ± 0.0 |",
                                                                   "| pcc | 2.0 ± 0.0 | 0.0 ± 0.0 |"]
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    assert list(compare_reports([tmp_path / "a.json", tmp_path / "b.json"], ["x", "y"])) == ["x", "y"]


def _score_cli(canaries, holdout, hyps, tmp_path, *extra):
    return run_privasr_cli("tools.score_exposure", "--canaries", canaries, "--holdout", holdout, "--hyps", hyps,
                           "--out", tmp_path / "e.json", *extra)


def test_cli_id_mismatches_are_one_line_errors(audit, tmp_path):
    canaries, holdout, _ = audit
    rows = [("canary_0000", "A"), ("canary_0001", "A")] + [(f"holdout_{i}", "A") for i in range(4)]
    extra = _hyps(tmp_path / "extra.csv", rows + [("stranger_1", "A"), ("stranger_2", "B")], header=("ID", "hyp"))
    assert_one_line_error(_score_cli(canaries, holdout, extra, tmp_path), "2 ID(s) not in", "stranger_1, stranger_2")
    missing = _hyps(tmp_path / "missing.csv", rows[1:], header=("ID", "hyp"))
    assert_one_line_error(_score_cli(canaries, holdout, missing, tmp_path), "no hypothesis for 1", "canary_0000")
    assert not (tmp_path / "e.json").exists()


def test_cli_bad_files_are_one_line_errors(audit, tmp_path):
    canaries, holdout, hyps = audit
    empty = _manifest(tmp_path / "empty.csv", [])
    assert_one_line_error(_score_cli(canaries, empty, hyps, tmp_path), "empty holdout")
    no_hyp = _hyps(tmp_path / "nohyp.csv", [("canary_0000", "1")], header=("ID", "score"))
    assert_one_line_error(_score_cli(canaries, holdout, no_hyp, tmp_path), "missing column(s) hyp")
    absent = tmp_path / "absent.csv"
    assert_one_line_error(_score_cli(canaries, holdout, absent, tmp_path), "absent.csv: file not found")
    assert_one_line_error(_score_cli(holdout, holdout, hyps, tmp_path), "missing column insertions")
    bad = _hyps(tmp_path / "bad.csv", [("canary_0000", "A", "abc")])
    assert_one_line_error(_score_cli(canaries, holdout, bad, tmp_path, "--metric", "score"), "bad.csv:2: score 'abc'")
    all_ids = ["canary_0000", "canary_0001"] + [f"holdout_{k}" for k in range(4)]
    flat = _hyps(tmp_path / "flat.csv", [(i, "", "1") for i in all_ids])
    assert_one_line_error(_score_cli(canaries, holdout, flat, tmp_path, "--method", "extrapolation"), "not all equal")
    assert_one_line_error(_score_cli(canaries, holdout, hyps, tmp_path, "--metric", "bleu"), "--metric")
    (tmp_path / "junk.json").write_text("{}")
    assert_one_line_error(run_privasr_cli("tools.score_exposure", "compare", tmp_path / "junk.json", "--plot",
                                          tmp_path / "x.png"), "not an exposure report")
