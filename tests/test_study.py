"""The mitigation-study driver end to end in its quick configuration, and its planning rules."""
import json
import os
import subprocess

import pytest

from privasr.core_log import predicted_weight_ratio
from privasr.study import canary_gradient_ratios, load_study, needed_quantiles, run_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY = os.path.join(ROOT, "egs", "mini_tts", "conf", "study.yaml")


def test_plan_keeps_the_total_batch_and_resolves_quantile_bounds(tmp_path):
    study = load_study(STUDY)
    (tmp_path / "B2_mean.json").write_text('{"2": {"p10": 0.5, "p50": 1.25}}')
    args = run_overrides(study, "pcc_B2_p50", tmp_path)
    assert "--virtual_cores=8" in args and "--batch_size=16" in args and "--clip_bound=1.25" in args
    assert f"--number_of_epochs={study['pretrain_epochs'] + study['finetune_epochs']}" in args
    # a configuration's own fine-tuning length (the length axis)
    assert f"--number_of_epochs={study['pretrain_epochs'] + 1}" in run_overrides(study, "baseline_ft1", tmp_path)
    assert "--clip_bound" not in " ".join(run_overrides(study, "apcc_B2", tmp_path))
    assert (2, "sum") in needed_quantiles(study) and (1, "mean") in needed_quantiles(study)
    with pytest.raises(FileNotFoundError, match="norm quantiles"):
        run_overrides(study, "pcc_B8_p10", tmp_path)


def test_a_configuration_with_a_bad_fine_tuning_length_is_refused(tmp_path):
    bad = tmp_path / "study.yaml"
    bad.write_text("total_batch: 4\npretrain_epochs: 1\nfinetune_epochs: 1\nquantile_batches: 2\nseeds: [1]\n"
                   "configs:\n  short: {clipping: none, per_core: 4, finetune_epochs: 0}\n")
    with pytest.raises(ValueError, match="short: finetune_epochs must be a positive integer"):
        load_study(bad)
    bad.write_text(bad.read_text().replace("finetune_epochs: 0", "reference: baseline"))
    with pytest.raises(ValueError, match="short: reference 'baseline' is not an unclipped"):
        load_study(bad)
    bad.write_text(bad.read_text().replace("reference: baseline}", "reference: clipped}\n"
                                           "  clipped: {clipping: pcc, per_core: 2, bound: 1.0}"))
    with pytest.raises(ValueError, match="short: reference 'clipped' is not an unclipped"):
        load_study(bad)


# A smaller corpus than --quick's own (120 / 20 / 20): every stage, configuration and check is the same, with
# 5 training steps an epoch instead of 15 (the runs' cost is mostly their steps and process start-up).
CORPUS = "--num-train 40 --num-dev 10 --num-test 10"
VARIANT_CORPUS = "--num-train 60 --num-dev 10 --num-test 10"  # the same seed: its first 40 utterances are CORPUS's


def test_quick_study_end_to_end(tmp_path):
    cmd = ["bash", os.path.join(ROOT, "egs", "mini_tts", "run_study.sh"), "--quick", "true", "--jobs", "2",
           "--data", str(tmp_path / "data"), "--exp", str(tmp_path / "exp"), "--corpus_args", CORPUS]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "exp" / "RESULTS.md").read_text()
    for name in ("baseline", "pec_p50", "pcc_B2_p10", "apcc_B2"):
        assert f"| {name} |" in report
    assert (tmp_path / "exp" / "exposure_vs_B_cer.png").exists()
    # fine-tuning continued from the pre-trained checkpoint: one more epoch, not a fresh start
    assert "epoch: 2" in (tmp_path / "exp" / "pcc_B2_p10" / "seed1" / "train_log.txt").read_text()
    # canary-aware diagnostics: every configuration's cores, with and without canaries
    assert "## Clipping of cores with and without a canary" in report
    assert "## Exposure ranked by loss, extrapolated" in report
    assert "| pcc_B2_p10 − baseline |" in report.split("### Change from the reference (CER), paired by seed")[1]
    assert (tmp_path / "exp" / "pcc_B2_p10" / "seed1" / "exposure_score_extrapolation.json").exists()
    cores = report.split("## Clipping of cores")[1]
    assert "| pec_p50 |" in cores
    # r measured on the pre-trained model for these canaries, its prediction beside the measured clip scales
    r = json.loads((tmp_path / "exp" / "canary_gradients.json").read_text())
    assert set(r["by_insertions"]) == {"1", "4"} and "predicted from r" in cores
    pcc_row = next(line for line in cores.splitlines() if line.startswith("| pcc_B2_p10 |"))
    predicted = predicted_weight_ratio(r["by_insertions"]["4"]["r_median"], 2)
    assert pcc_row.rstrip(" |").endswith(f"{predicted:.3g}")  # x1 / x4: the last cell is x4's at B = 2
    assert (tmp_path / "exp" / "core_stats.png").stat().st_size > 1000
    # the exact driver command that trained the runs, for re-running the grid
    assert "run_study.sh --quick true --jobs 2" in report.split("## Commands that trained these runs")[1]

    # a canary variant (rarity): its own larger corpus, canaries and results; the same pre-training and quantiles
    pretrain_ckpts = sorted(os.listdir(tmp_path / "exp" / "pretrain" / "save"))
    variant = subprocess.run(cmd + ["--variant", "rare", "--canary_args", "--per-count 1 --counts 1 4 --holdout 20",
                                    "--variant_corpus_args", VARIANT_CORPUS, "--configs", "baseline"],
                             capture_output=True, text=True, timeout=600)
    assert variant.returncode == 0, variant.stdout[-3000:] + variant.stderr[-3000:]
    assert "pre-training already done" in variant.stdout
    assert json.loads((tmp_path / "exp" / "rare" / "canary_gradients.json").read_text())["canaries"]["n"] == 2
    assert sorted(os.listdir(tmp_path / "exp" / "pretrain" / "save")) == pretrain_ckpts
    rare = (tmp_path / "exp" / "rare" / "RESULTS.md").read_text()
    assert "| baseline |" in rare and "| pcc_B2_p10 |" not in rare  # --configs selects the grid's rows
    canaries = (tmp_path / "data" / "canaries_rare" / "canaries.csv").read_text().splitlines()
    assert len(canaries) == 1 + 2  # one canary per count, counts 1 and 4
    inserted = (tmp_path / "data" / "canaries_rare" / "train_with_canaries.csv").read_text()
    # inserted into the variant's 60-utterance corpus, whose first 40 utterances are the pre-training's
    def texts(path):  # ID, speaker and words of each utterance (the WAV paths differ)
        return [(row[0], row[-2], row[-1]) for row in (line.split(",") for line in path.read_text().splitlines())]
    base, larger = texts(tmp_path / "data" / "train.csv"), texts(tmp_path / "data_rare" / "train.csv")
    assert len(base) == 1 + 40 and len(larger) == 1 + 60 and larger[:len(base)] == base
    assert len(inserted.splitlines()) == 1 + 60 + 1 * 1 + 1 * 4
    assert all(inserted.count(line.split(",")[0] + "_r") == int(line.rsplit(",", 1)[1]) for line in canaries[1:])
    # the variant re-run with other canaries refuses its runs trained on the old ones, instead of reusing them:
    # stage 2 remakes the canaries, stage 6 refuses (stages 3-5, between them, were checked above: the tokenizer
    # and the pre-training are kept, r is measured for the variant's canaries)
    other = cmd + ["--variant", "rare", "--canary_args", "--per-count 1 --counts 1 2 --holdout 20",
                   "--variant_corpus_args", VARIANT_CORPUS, "--configs", "baseline"]
    remade = subprocess.run(other + ["--stop_stage", "2"], capture_output=True, text=True, timeout=600)
    assert remade.returncode == 0, remade.stdout[-3000:] + remade.stderr[-3000:]
    remade_counts = [int(line.rsplit(",", 1)[1]) for line in
                     (tmp_path / "data" / "canaries_rare" / "canaries.csv").read_text().splitlines()[1:]]
    assert sorted(remade_counts) == [1, 2]
    refused = subprocess.run(other + ["--stage", "6"], capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "holds a run made with other settings (data.canaries_csv: " in refused.stdout


def test_r_of_other_canaries_is_refused(tmp_path):
    """canary_gradients.json is read only for the canaries it measured (their bytes), r per insertion count."""
    from privasr.provenance import file_digest

    canaries, record = tmp_path / "canaries.csv", tmp_path / "canary_gradients.json"
    canaries.write_text("ID,duration,wav,spk_id,wrd,insertions\nc1,1.0,a.wav,s,A B,1\n")
    record.write_text(json.dumps({"canaries_sha256": file_digest(canaries), "by_insertions": {
        "1": {"r_median": 1.5}, "4": {"r_median": None}}}))
    assert canary_gradient_ratios(record, canaries) == {1: 1.5}
    assert canary_gradient_ratios(tmp_path / "absent.json", canaries) is None
    canaries.write_text(canaries.read_text().replace("A B", "C D"))  # remade canaries: same IDs, new words
    with pytest.raises(ValueError, match="measured on other canaries"):
        canary_gradient_ratios(record, canaries)
