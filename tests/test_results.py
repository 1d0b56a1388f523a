"""privasr.results_md, the one RESULTS.md writer: blocks, tables, cells, the atomic write; and a report built on it."""
import json
import os

import pytest

from privasr.results_md import ResultsMarkdown, mean_std, table_lines, write_atomic


def test_a_report_is_its_title_and_blocks_one_blank_line_apart():
    report = ResultsMarkdown("Results")
    report.paragraph("Methods: pcc.")
    report.heading("WER (%)")
    report.table(["method", "test"], [["pcc", 12.5], ["apcc", None]])
    report.heading("Change", level=3)
    report.lines("| a |\n|---|\n\n")  # another module's table, its trailing newlines dropped
    report.image("exposure", "exposure_cer.png")
    report.commands("Commands", None)  # no commands file: no section
    report.code(["run.sh --stage 4", "", "run.sh --stage 6"])
    assert report.text() == ("# Results\n\nMethods: pcc.\n\n## WER (%)\n\n| method | test |\n|---|---|\n"
                             "| pcc | 12.5 |\n| apcc | None |\n\n### Change\n\n| a |\n|---|\n\n"
                             "![exposure](exposure_cer.png)\n\n```\nrun.sh --stage 4\n\nrun.sh --stage 6\n```\n")


def test_commands_are_listed_from_their_file(tmp_path):
    commands = tmp_path / "commands.txt"
    commands.write_text("run_study.sh --jobs 2\nrun_study.sh --variant rare\n")
    report = ResultsMarkdown("Study")
    report.commands("Commands that trained these runs", commands)
    assert report.text() == ("# Study\n\n## Commands that trained these runs\n\n```\nrun_study.sh --jobs 2\n"
                             "run_study.sh --variant rare\n```\n")
    report.commands("Absent", tmp_path / "absent.txt")
    assert "Absent" not in report.text()


def test_mean_std_cells_leave_out_missing_and_non_finite_values():
    assert mean_std([1.0, None, 3.0, float("nan"), float("inf")]) == "2.00 ± 1.00"  # population std of 1, 3
    assert mean_std([2.5]) == "2.50"
    assert mean_std([]) == mean_std([None, float("nan")]) == "–"


def test_a_row_of_the_wrong_width_is_refused():
    assert table_lines(["a", "b"], []) == ["| a | b |", "|---|---|"]
    with pytest.raises(ValueError, match=r"a table row has 1 cells, its header 2: \['x'\]"):
        table_lines(["a", "b"], [["x"]])
    with pytest.raises(ValueError, match="level 2, 3 or 4"):
        ResultsMarkdown("t").heading("h", level=1)


def test_the_write_replaces_the_file_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "exp" / "RESULTS.md"
    report = ResultsMarkdown("New")
    assert report.write(path) == path and path.read_text() == "# New\n"  # the folder is made
    assert os.listdir(path.parent) == ["RESULTS.md"]  # no temporary file left
    path.write_text("# Old\n")

    def killed(src, dst):
        raise OSError("killed before the rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(OSError, match="killed"):
        write_atomic(path, "# Half\n")
    assert path.read_text() == "# Old\n"  # a reader never sees a partial report


def test_dp_results_put_each_model_s_wer_next_to_epsilon(tmp_path):
    """privasr.ssl.results on a hand-made privacy.json and transcripts, against the text written out by hand."""
    from privasr.ssl.results import results_markdown, write_results

    pretrain = tmp_path / "pretrain"
    pretrain.mkdir()
    pretrain.joinpath("privacy.json").write_text(json.dumps({
        "epsilon": 4.110901622612281, "delta": 1e-05, "accountant": "rdp", "steps": 7, "noise_multiplier": 1.0,
        "sample_rate": 0.14814814814814814, "expected_batch_size": 8.0, "dataset_size": 54, "clip_bound": 1.0,
        "clip_mode": "dim", "target_epsilon": None, "stopped_at_target": False, "frozen_layers": ["enc.layers.1"],
        "warm_start_steps": 4, "trained_parameters": 224960, "total_parameters": 326080}))
    runs = {}
    for name, dev_hyp, test_hyp in (("dp", "A B X D", "A B C D"), ("scratch", "A", "X Y Z W")):
        hyps = tmp_path / name / "hyps"
        hyps.mkdir(parents=True)
        for split, hyp in (("dev", dev_hyp), ("test", test_hyp)):
            (hyps / f"{split}.csv").write_text(f"ID,hyp,ref,score\nu1,{hyp},A B C D,1.0\n")
        runs[name] = tmp_path / name
    expected = (
        "# DP pre-training (BEST-RQ + DP-SGD), then CTC fine-tuning\n\n"
        "| model | encoder pre-training | ε | δ | dev WER (%) | test WER (%) |\n|---|---|---|---|---|---|\n"
        "| dp | BEST-RQ, DP-SGD | 4.11 | 1e-05 | 25.00 | 0.00 |\n"  # one substitution in 4 words
        "| scratch | none (random init) | 0 | 1e-05 | 75.00 | 100.00 |\n\n"  # 3 deletions; 4 substitutions
        "**Guarantee.** The encoder is (4.111, 1e-05)-DP with respect to the 54 private pre-training utterances "
        "(RDP accountant, add/remove-one neighbours); the fine-tuning data is treated as public, as in the paper.\n\n"
        "**DP-SGD.** σ = 1, C = 1 (dim clipping), q = 0.1481 (expected batch 8), 7 steps.\n\n"
        "**Warm-start and LayerFreeze.** 4 non-private steps on the public subset; 1 layer(s) frozen "
        "(101,120 of 326,080 parameters): enc.layers.1.\n")
    assert results_markdown(pretrain, runs) == expected
    out = write_results(tmp_path / "dp" / "RESULTS.md", pretrain, runs)
    assert out.read_text(encoding="utf-8") == expected
    with pytest.raises(ValueError, match="run the fine-tuning stage of 'late' first"):
        results_markdown(pretrain, {"late": tmp_path / "late"})
