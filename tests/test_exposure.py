"""Exposure: hand-computed ranks, scipy's skew-normal, jiwer-consistent error rates, the CLI."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import subprocess

import numpy as np
import pytest
from scipy.stats import skewnorm

from privasr.exposure import (EXTRAPOLATION_CAP_BITS, compare_reports, difference_over_seeds, error_rates,
                              exposure_extrapolation, exposure_interpolation, markdown_table, ranks, score_exposure,
                              summarize_by_insertions, summarize_over_seeds)
from tests.conftest import assert_one_line_error, run_privasr_cli
from privasr.cli.score_exposure import main as score_main

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
    proc = run_privasr_cli("privasr.cli.score_exposure", "--canaries", canaries, "--holdout", holdout, "--hyps", hyps,
                           "--out", tmp_path / "a.json", "--plot", tmp_path / "a.png", "--label", "base")
    assert proc.returncode == 0, proc.stderr
    assert "| base | 2.0 ± 0.0 | 0.4 ± 0.0 |" in proc.stdout
    assert "exposure by cer (lower = likelier), |R| = 4, ties: mean, interpolation" in proc.stdout
    report = json.loads((tmp_path / "a.json").read_text())
    assert set(report) >= {"holdout_size", "metric", "direction", "method", "ties", "per_canary", "by_insertions"}
    assert set(report["per_canary"][0]) >= {"id", "insertions", "score", "rank", "exposure"}
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    # a second run whose canary_0001 is transcribed exactly (CER 0: better than every holdout utterance)
    rows = [r for r in csv.reader(open(hyps))][1:]
    exact = _hyps(tmp_path / "exact.csv", [(i, "ABCD" if i == "canary_0001" else h, s) for i, h, s in rows])
    status = score_main(["--canaries", str(canaries), "--holdout", str(holdout), "--hyps", str(exact),
                         "--out", str(tmp_path / "b.json"), "--label", "pcc"])
    assert status == 0
    status = score_main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                         "--plot", str(tmp_path / "cmp.png"), "--out", str(tmp_path / "cmp.md")])
    assert status == 0
    assert (tmp_path / "cmp.md").read_text().splitlines()[2:] == ["| base | 2.0 ± 0.0 | 0.4 ± 0.0 |",
                                                                   "| pcc | 2.0 ± 0.0 | 2.0 ± 0.0 |"]
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    assert list(compare_reports([tmp_path / "a.json", tmp_path / "b.json"], ["x", "y"])) == ["x", "y"]


def _in_process(*args) -> subprocess.CompletedProcess:
    """``privasr-exposure ARGS`` called in-process (fast), as a CompletedProcess for assert_one_line_error."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = score_main([str(a) for a in args])
    return subprocess.CompletedProcess(args, status, out.getvalue(), err.getvalue())


def _score_cli(canaries, holdout, hyps, tmp_path, *extra):
    return _in_process("--canaries", canaries, "--holdout", holdout, "--hyps", hyps, "--out", tmp_path / "e.json",
                       *extra)


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
    assert_one_line_error(_in_process("compare", tmp_path / "junk.json", "--plot",
                                          tmp_path / "x.png"), "not an exposure report")


# ------------------------------------------------------------------ range, direction, comparability, BOM
def test_range_of_exposure_for_both_tie_rules():
    """Floor log2(|R|/(|R|+1)), ceiling log2 |R|; the all-tied model: ~1 bit (mean) or the floor (reference)."""
    size = 1000
    holdout = np.linspace(0.1, 0.9, size)  # distinct scores
    for ties in ("mean", "reference"):
        _, exposure = exposure_interpolation([0.0, 1.0], holdout, ties)
        np.testing.assert_allclose(exposure, [math.log2(size), math.log2(size / (size + 1))])
    _, tied_mean = exposure_interpolation([1.0], np.ones(size), "mean")
    _, tied_reference = exposure_interpolation([1.0], np.ones(size), "reference")
    assert tied_mean[0] == pytest.approx(math.log2(size) - math.log2(1 + size / 2))  # 0.9971
    assert tied_reference[0] == pytest.approx(math.log2(size / (size + 1)))  # -0.0014: the floor
    # a canary the model treats like holdout: rank uniform on 1..|R|+1, mean exposure ~ log2(e)
    _, every_rank = exposure_interpolation(np.linspace(0.0, 1.0, 2 * size + 1), holdout, "reference")
    uniform = np.mean([math.log2(size) - math.log2(r) for r in range(1, size + 2)])
    assert uniform == pytest.approx(math.log2(math.e), abs=0.01)
    assert every_rank.min() == pytest.approx(math.log2(size / (size + 1)))


def test_higher_is_likelier_reverses_the_ranking(audit):
    """Scores 0.1 and 3 against holdout 1, 2, 2, 4: lower-is-likelier ranks 1 and 4; higher-is-likelier 5 and 2."""
    lower = score_exposure(*audit, metric="score")
    assert lower["direction"] == "lower"
    assert [c["rank"] for c in lower["per_canary"]] == [1.0, 4.0]
    higher = score_exposure(*audit, metric="score", direction="higher")
    assert higher["direction"] == "higher"
    assert [c["rank"] for c in higher["per_canary"]] == [5.0, 2.0]  # 0.1 below all; 3 above 1, 2, 2
    assert [c["exposure"] for c in higher["per_canary"]] == pytest.approx([2 - math.log2(5), 1.0])
    assert [c["score"] for c in higher["per_canary"]] == [0.1, 3.0]  # scores as read
    with pytest.raises(ValueError, match="direction 'higher' only applies to metric 'score'"):
        score_exposure(*audit, metric="cer", direction="higher")


def test_direction_is_documented_in_help(capsys):
    assert score_main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--direction {lower,higher}" in text and "lower (default; CER, WER and a loss" in text


def _with(path, out, **changes):
    report = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            report.pop(key)
        else:
            report[key] = value
    out.write_text(json.dumps(report))
    return out


@pytest.mark.parametrize("changes, fragment", [
    ({"metric": "score"}, "metric cer ("),
    ({"direction": "higher", "metric": "score"}, "direction lower ("),
    ({"holdout_size": 1000}, "holdout_size 4 ("),
    ({"ties": "reference"}, "ties mean ("),
    ({"method": "extrapolation"}, "method interpolation ("),
    ({"holdout_size": None}, "no 'holdout_size' recorded"),
])
def test_compare_refuses_reports_that_are_not_comparable(audit, tmp_path, capsys, changes, fragment):
    report = tmp_path / "a.json"
    report.write_text(json.dumps(score_exposure(*audit)))
    other = _with(report, tmp_path / "b.json", **changes)
    before = sorted(tmp_path.iterdir())
    status = score_main(["compare", str(report), str(other), "--plot", str(tmp_path / "cmp.png"),
                         "--out", str(tmp_path / "cmp.md")])
    lines = capsys.readouterr().err.splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("privasr-exposure: error: exposure reports are "
                                                                    "not comparable" if "recorded" not in fragment
                                                                    else "privasr-exposure: error: ")
    assert fragment in lines[0]
    assert sorted(tmp_path.iterdir()) == before  # neither the table nor the plot


def test_a_report_without_direction_is_lower_is_likelier(audit, tmp_path):
    """Reports written before --direction existed ranked lower-is-likelier: they compare with new ones."""
    report = tmp_path / "a.json"
    report.write_text(json.dumps(score_exposure(*audit)))
    old = _with(report, tmp_path / "old.json", direction=None)
    assert list(compare_reports([report, old], ["new", "old"])) == ["new", "old"]
    with pytest.raises(ValueError, match="not comparable: metric"):
        summarize_over_seeds([score_exposure(*audit), score_exposure(*audit, metric="score")])
    with pytest.raises(ValueError, match="not comparable: ties"):
        difference_over_seeds({"1": score_exposure(*audit)}, {"1": score_exposure(*audit, ties="reference")})


def test_byte_order_mark_is_accepted(audit, tmp_path):
    """CSV files saved by a spreadsheet start with a UTF-8 BOM: same report as without it."""
    bom = []
    for path in audit:
        copy = tmp_path / f"bom_{path.name}"
        copy.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
        bom.append(copy)
    assert score_exposure(*bom) == score_exposure(*audit)
    assert score_exposure(*bom, metric="score") == score_exposure(*audit, metric="score")
    broken = tmp_path / "bom_broken.csv"
    broken.write_bytes(b"\xef\xbb\xbfID,hyp\ncanary_0000\n")
    with pytest.raises(ValueError, match=f"{broken}:2: expected 2 fields"):  # errors name the user's file
        score_exposure(audit[0], audit[1], broken)
