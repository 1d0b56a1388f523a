"""The main job's quick configuration end to end (stages 0-6), and the stage grammar."""
import csv
import json
import os
import shutil
import subprocess

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from privasr.core_log import read_core_logs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "egs", "mini_tts", "run.sh")


# --quick true on a smaller corpus than quick's own (120 / 20 / 20; the canaries and holdout are quick's), passed to
# every run on the module's corpus: every stage and check is the same with 10 training steps an epoch instead of 16
# (70 utterances + 2 x 1 + 2 x 4 canary copies, batch 8): still one TensorBoard clipping record
# (log_every_n_steps: 10), without --train_args (each costs run.sh a Python start-up to check them).
QUICK = ("--quick", "true", "--corpus_args", "--num-train 70 --num-dev 10 --num-test 10")


def run(*args, timeout=600):
    return subprocess.run(["bash", RUN, *args], capture_output=True, text=True, timeout=timeout)


def run_quick(*args):
    """run.sh --quick true on the module's corpus size."""
    return run(*QUICK, *args)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("mini_tts")
    data, exp = str(work / "data"), str(work / "exp")
    result = run_quick("--data", data, "--exp", exp, "--methods", "baseline pcc apcc", "--jobs", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work, data, exp, result


def test_quick_run_writes_every_table_and_plot(quick_run):
    work, data, exp, result = quick_run
    report = open(os.path.join(exp, "RESULTS.md")).read()
    for heading in ("WER (%) — Table 2", "Generalization gap — Table 5", "Exposure ranked by CER — Table 1",
                    "Exposure ranked by loss — Table 1"):
        assert heading in report
    for method in ("baseline", "pcc", "apcc"):
        assert f"| {method} |" in report
        exposure = json.load(open(os.path.join(exp, method, "seed1", "exposure_cer.json")))
        assert exposure["holdout_size"] == 20 and set(exposure["by_insertions"]) == {"1", "4"}
        events = EventAccumulator(os.path.join(exp, method, "seed1", "tensorboard"))
        events.Reload()
        assert {"clipping/core_norm_median", "train/loss", "valid/WER"} <= set(events.Tags()["scalars"])
        cores = read_core_logs(os.path.join(exp, method, "seed1", "core_stats"))
        assert set(cores["label"]) == {0, 1, 4}  # cores without canary, with a x1 and with a x4 canary
    assert os.path.getsize(os.path.join(exp, "exposure_cer.png")) > 1000
    # every stage printed one timestamped line
    for n in range(7):
        assert f"] stage {n}: " in result.stdout


def test_methods_fine_tune_one_shared_canary_free_pre_training(quick_run):
    """--pretrain_epochs (quick: 1): one baseline on train.csv without canaries, then each method continues
    from its checkpoint for --finetune_epochs (1) with them, carries its record, and is decoded at its last epoch."""
    _, data, exp, result = quick_run
    pretrain = os.path.join(exp, "pretrain")
    recorded = json.load(open(os.path.join(pretrain, "fingerprint.json")))
    assert recorded["data"]["canaries_csv"] is None and recorded["settings"]["clipping"] == "none"
    assert recorded["settings"]["number_of_epochs"] == 1
    assert "pre-train 1 epochs without canaries, then train (baseline pcc apcc)" in result.stdout
    for method in ("baseline", "pcc", "apcc"):
        run_dir = os.path.join(exp, method, "seed1")
        assert json.load(open(os.path.join(run_dir, "init_fingerprint.json"))) == recorded
        epochs = [line.split(" - ")[0] for line in open(os.path.join(run_dir, "train_log.txt")) if "train loss" in line]
        assert epochs == ["epoch: 2"]  # one epoch, after the pre-training's
        assert "Epoch loaded: 2" in open(os.path.join(run_dir, "train_log.txt")).read()
    report = open(os.path.join(exp, "RESULTS.md")).read()
    assert "| 1 epochs without canaries (pre-training " in report and "then 1 with them | 1 |" in report


def test_number_of_epochs_with_a_pre_training_is_refused(tmp_path):
    result = run("--train_args", "--number_of_epochs=3", "--exp", str(tmp_path / "exp"), "--data", str(tmp_path / "d"))
    assert result.returncode == 2 and "--pretrain_epochs + --finetune_epochs: give those instead" in result.stderr
    assert not (tmp_path / "d").exists()


def test_hyps_carry_the_per_utterance_loss_as_score(quick_run):
    _, _, exp, _ = quick_run

    rows = list(csv.DictReader(open(os.path.join(exp, "pcc", "seed1", "hyps", "holdout.csv"))))
    assert len(rows) == 20 and set(rows[0]) == {"ID", "hyp", "ref", "score"}
    assert all(float(r["score"]) > 0 for r in rows)


def test_rerun_skips_work_already_done(quick_run):
    work, data, exp, _ = quick_run
    # (--jobs 2: the two runs' checks side by side; skipping is what is checked, not the order)
    result = run_quick("--data", data, "--exp", exp, "--methods", "baseline pcc", "--stop_stage", "5", "--jobs", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "baseline seed 1 already trained with these settings" in result.stdout
    assert "pcc seed 1 already decoded from this checkpoint" in result.stdout
    assert "canaries already made" in result.stdout, result.stdout[-2000:]


def test_tokenizer_options_override_the_yaml(quick_run):
    """--tokenizer_type / --vocab_size: sentencepiece pieces instead of the YAML's characters (the
    paper-faithful fast canary needs them) for the tokenizer stage (launch_train passes both to train.py too)."""
    work, data, _, _ = quick_run
    other = work / "data_unigram"
    other.mkdir()
    for name in ("train.csv", "dev.csv", "test.csv"):
        shutil.copy(os.path.join(data, name), other / name)
    result = run_quick("--data", str(other), "--tokenizer_type", "unigram", "--vocab_size", "60",
                       "--stage", "3", "--stop_stage", "3")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    config = json.loads((other / "tokenizer" / "tokenizer.json").read_text())
    assert (config["model_type"], config["vocab_size"]) == ("unigram", 60)


def test_two_cpu_processes_train_under_torchrun(quick_run):
    """--nproc 2 on a machine without CUDA: gloo, 2 ranks x 2 virtual cores, a core log per rank."""
    work, data, _, _ = quick_run
    exp = str(work / "exp_nproc2")
    result = run_quick("--data", data, "--exp", exp, "--methods", "pcc", "--nproc", "2", "--pretrain_epochs", "0",
                       "--virtual_cores", "2", "--stage", "4", "--stop_stage", "4")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = os.path.join(exp, "pcc_k2_p2", "seed1")  # the run name says the settings given
    assert os.path.exists(os.path.join(run_dir, ".trained"))
    assert json.load(open(os.path.join(run_dir, "fingerprint.json")))["cores"]["total"] == 4
    for rank in (0, 1):
        assert os.path.getsize(os.path.join(run_dir, "core_stats", f"core_stats.rank{rank}.csv")) > 0


def test_runs_trained_with_other_canaries_are_refused(quick_run):
    """Changing the canaries under an existing exp/ must not score old models against new canaries."""
    work, data, exp, _ = quick_run
    data2, exp2 = work / "data_changed", work / "exp_changed"
    shutil.copytree(data, data2)
    shutil.copytree(exp, exp2)
    result = run_quick("--data", str(data2), "--exp", str(exp2), "--methods", "baseline",
                       "--canary_args", "--per-count 1 --counts 1 4 --holdout 20", "--stage", "2", "--stop_stage", "5")
    assert result.returncode == 2, result.stdout[-2000:]
    assert "FAILED: training baseline seed 1: train.py: error: " in result.stdout
    assert "holds a run made with other settings (data.canaries_csv: " in result.stdout
    assert "another --exp" in result.stdout


def test_old_transcripts_are_not_scored_against_remade_canaries(quick_run):
    """Canaries remade with the same IDs and new texts: scoring refuses the old transcripts (was: 4.3 bits as 0.3)."""
    work, data, exp, _ = quick_run
    data2, exp2 = work / "data_remade", work / "exp_remade"
    shutil.copytree(data, data2)
    shutil.copytree(exp, exp2)
    canaries = data2 / "canaries" / "canaries.csv"
    with open(canaries, newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    table[0]["wrd"] = "REMADE WORDS HERE"  # same ID, new text
    with open(canaries, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    result = run_quick("--data", str(data2), "--exp", str(exp2), "--methods", "pcc",
                       "--stage", "6", "--stop_stage", "6")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "privasr.results: error: " in result.stderr and "decode again" in result.stderr
    assert (exp2 / "pcc" / "seed1" / "exposure_cer.json").read_text() == (
        open(os.path.join(exp, "pcc", "seed1", "exposure_cer.json")).read())  # nothing re-scored


def test_the_header_example_gets_a_run_of_its_own(quick_run):
    """`--stage 4 --stop_stage 6 --methods pcc --clip_bound 0.5` after the default job: a new run, not the b=1 one."""
    work, data, exp, _ = quick_run
    exp2 = work / "exp_bound"
    shutil.copytree(exp, exp2)
    result = run_quick("--data", data, "--exp", str(exp2), "--methods", "pcc", "--clip_bound", "0.5",
                       "--stage", "4", "--stop_stage", "6")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "training pcc seed 1 -> " + str(exp2 / "pcc_b0.5" / "seed1") in result.stdout
    fingerprint = json.load(open(exp2 / "pcc_b0.5" / "seed1" / "fingerprint.json"))
    assert fingerprint["settings"]["clip_bound"] == 0.5
    report = (exp2 / "RESULTS.md").read_text()
    assert "| pcc_b0.5 | pcc, b=0.5, B=2, C=4 | 1 epochs without canaries (pre-training " in report, report[:800]
    # a change the run name does not encode is refused, naming the key
    result = run_quick("--data", data, "--exp", str(exp2), "--methods", "pcc", "--stage", "4",
                       "--stop_stage", "4", "--train_args", "--lr=0.01")
    assert result.returncode == 2  # (the shared pre-training is the first run refused)
    assert "pre-training failed: " in result.stderr and "settings.lr: 0.001 there, 0.01 here" in result.stderr


def test_a_kept_pre_training_is_verified_installed_and_fine_tuned(quick_run):
    """--pretrained KEPT (the full job's default, pretrained/wellfit): stage 3 installs its tokenizer, stage 4 its
    model, and the methods fine-tune it with its model settings; an altered one, or a fine-tuning asking for another
    model, is refused in one line."""
    work, data, exp, _ = quick_run
    kept = work / "kept"
    subprocess.run([os.path.join(ROOT, ".venv", "bin", "privasr-pretrained"), "keep", os.path.join(exp, "pretrain"),
                    "--tokenizer", os.path.join(data, "tokenizer"), "--out", str(kept)], check=True, capture_output=True)
    exp2 = work / "exp_kept"
    result = run_quick("--pretrained", str(kept), "--data", data, "--exp", str(exp2), "--methods", "baseline",
                       "--stage", "3")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "kept pre-training " + str(kept) + ": 1 epochs" in result.stdout
    assert f"tokenizer already in {data}/tokenizer" in result.stdout  # it is the one the quick run made
    recorded = json.load(open(os.path.join(exp, "pretrain", "fingerprint.json")))
    assert json.load(open(exp2 / "pretrain" / "fingerprint.json")) == recorded
    assert json.load(open(exp2 / "baseline" / "seed1" / "init_fingerprint.json")) == recorded
    assert "Epoch loaded: 2" in (exp2 / "baseline" / "seed1" / "train_log.txt").read_text()
    report = (exp2 / "RESULTS.md").read_text()
    assert "| 1 epochs without canaries (pre-training " in report
    # altered: refused before any stage, nothing made
    bad = work / "kept_bad"
    shutil.copytree(kept, bad)
    model = next(bad.glob("save/CKPT*/model.ckpt"))
    weights = bytearray(model.read_bytes())
    weights[len(weights) // 2] ^= 0xFF  # one byte of one weight
    model.write_bytes(bytes(weights))
    result = run_quick("--pretrained", str(bad), "--data", data, "--exp", str(work / "exp_bad"), "--stage", "3")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--pretrained: " in result.stderr and "model.ckpt differs from the kept one" in result.stderr
    assert not (work / "exp_bad").exists()
    result = run_quick("--pretrained", str(kept), "--pretrain_epochs", "2", "--data", data, "--exp", str(exp2))
    assert result.returncode == 2 and "a kept pre-training has its own epochs" in result.stderr
    # another model than the kept one's: train.py refuses the fine-tuning (its checkpoint would load silently)
    result = run_quick("--pretrained", str(kept), "--data", data, "--exp", str(work / "exp_other_model"),
                       "--methods", "baseline", "--stage", "4", "--stop_stage", "4",
                       "--train_args", "--subsampling_factor=2")
    assert result.returncode == 2, result.stdout[-2000:]
    assert "trained with subsampling_factor 4, but this run asks for 2" in result.stdout


def test_jobs_must_be_a_whole_number():
    result = run("--jobs", "0")
    assert result.returncode == 2 and "--jobs takes a whole number >= 1, got '0'" in result.stderr


def test_unknown_option_is_refused_with_the_known_ones():
    result = run("--stages", "3")
    assert result.returncode == 2
    assert "unknown option --stages" in result.stderr and "--stop_stage" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_method_is_refused(tmp_path):
    result = run("--quick", "true", "--methods", "dpsgd", "--stage", "4", "--stop_stage", "4",
                 "--data", str(tmp_path / "d"), "--exp", str(tmp_path / "e"))
    assert result.returncode == 2 and "unknown method 'dpsgd'" in result.stderr
