"""egs/librispeech/run.sh and run_dp.sh end to end on fabricated LibriSpeech / Libri-Light trees
(the real layouts, noise audio), and the LibriSpeech recipe YAMLs themselves on the meta device.

The paper's models are Conformer XL; on 2 CPU cores the staged runs override them with the
`tiny` size, while the meta-device tests build the YAMLs exactly as shipped.
"""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from hyperpyyaml import load_hyperpyyaml

from privasr.data.librilight import prepare_librilight
from privasr.data.librispeech import prepare_librispeech, write_recipe_manifests
from privasr.models import count_parameters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "egs", "librispeech", "run.sh")
RUN_DP = os.path.join(ROOT, "egs", "librispeech", "run_dp.sh")
ASR_HPARAMS = Path(ROOT) / "recipes" / "LibriSpeech" / "ASR" / "conformer" / "hparams"
WORDS = "THE CAT SAT ON A MAT WITH HER OLD DOG AND RAN HOME AT NIGHT".split()


def fabricate_librispeech(root, splits, speakers=2, chapters=1, utterances=3):
    rng = np.random.default_rng(0)
    for split in splits:
        for spk in range(speakers):
            for chapter in range(chapters):
                d = root / "LibriSpeech" / split / str(100 + spk) / str(10 + chapter)
                d.mkdir(parents=True)
                lines = []
                for u in range(utterances):
                    uid = f"{100 + spk}-{10 + chapter}-{u:04d}"
                    soundfile.write(d / f"{uid}.flac", rng.normal(0, 0.1, 16000 + 4000 * u).astype("float32"), 16000)
                    lines.append(f"{uid} " + " ".join(rng.choice(WORDS, 4)))
                (d / f"{100 + spk}-{10 + chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    return root / "LibriSpeech"


def fabricate_librilight(root, subset="small", speakers=2, books=1, files=3, seconds=1.0):
    """Libri-Light's <subset>/<speaker>/<book>/<file>.flac layout (cut segments), noise audio."""
    rng = np.random.default_rng(1)
    for spk in range(speakers):
        for book in range(books):
            d = root / subset / str(200 + spk) / f"book_{book}_librivox_64kb_mp3"
            d.mkdir(parents=True)
            for f in range(files):
                n = int(16000 * (seconds + 0.2 * f))
                soundfile.write(d / f"{f:02d}_reading_64kb_{f}.flac", rng.normal(0, 0.1, n).astype("float32"), 16000)
    return root


def run(*args, script=RUN):
    return subprocess.run(["bash", script, *args], capture_output=True, text=True, timeout=600)


def test_fabricated_librispeech_end_to_end(tmp_path):
    corpus = fabricate_librispeech(tmp_path, ["train-clean-100", "dev-clean", "test-clean"])
    result = run("--librispeech_root", str(corpus), "--train_splits", "train-clean-100",
                 "--data", str(tmp_path / "data"), "--exp", str(tmp_path / "exp"), "--methods", "pcc",
                 "--vocab_size", "20", "--canary_args", "--per-count 1 --counts 1 2 --holdout 4",
                 "--train_args", "--model_size=tiny --number_of_epochs=1 --batch_size=4 --virtual_cores=2 "
                                 "--train_eval_size=4 --num_workers=0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = open(tmp_path / "exp" / "pcc" / "seed1" / "train_log.txt").read()
    assert "epoch: 1" in log
    results = open(tmp_path / "exp" / "RESULTS.md").read()
    assert "| pcc |" in results


def test_missing_corpus_is_named(tmp_path):
    result = run("--librispeech_root", str(tmp_path), "--stop_stage", "0")
    assert result.returncode == 2
    assert "split 'train-clean-100' not found" in result.stderr and "Traceback" not in result.stderr


def test_librilight_manifest_ids_durations_and_idempotence(tmp_path):
    root = fabricate_librilight(tmp_path / "ll", files=2)
    out = prepare_librilight(root, ["small"], tmp_path / "data" / "librilight.csv")
    lines = out.read_text().splitlines()
    assert lines[0] == "ID,duration,wav,spk_id,wrd" and len(lines) == 1 + 4
    first = lines[1].split(",")
    assert first[0] == "200-book_0_librivox_64kb_mp3-00_reading_64kb_0" and float(first[1]) == 1.0
    assert first[2].endswith("small/200/book_0_librivox_64kb_mp3/00_reading_64kb_0.flac") and first[3] == "200"
    assert float(lines[2].split(",")[1]) == pytest.approx(1.2)
    stamp = out.stat().st_mtime_ns
    prepare_librilight(root, ["small"], out)
    assert out.stat().st_mtime_ns == stamp  # nothing rewritten
    with pytest.raises(FileNotFoundError, match="subset 'medium' not found"):
        prepare_librilight(root, ["small", "medium"], out)


def test_recipe_manifests_are_written_once(tmp_path):
    corpus = fabricate_librispeech(tmp_path, ["train-clean-100", "dev-clean", "test-clean"])
    prepared = prepare_librispeech(corpus, ["train-clean-100", "dev-clean", "test-clean"], tmp_path / "ls")
    outputs = write_recipe_manifests(prepared, tmp_path / "data", ["train-clean-100"])
    assert outputs["train"].read_text() == prepared["train-clean-100"].read_text()
    assert outputs["test"].read_text() == prepared["test-clean"].read_text()
    stamps = {name: path.stat().st_mtime_ns for name, path in outputs.items()}
    write_recipe_manifests(prepared, tmp_path / "data", ["train-clean-100"])
    assert {name: path.stat().st_mtime_ns for name, path in outputs.items()} == stamps
    # a split manifest rewritten (e.g. from another corpus root) is picked up
    rows = prepared["dev-clean"].read_text().splitlines()
    prepared["dev-clean"].write_text("\n".join(rows[:2]) + "\n")
    write_recipe_manifests(prepared, tmp_path / "data", ["train-clean-100"])
    assert outputs["dev"].read_text().splitlines() == rows[:2]
    with pytest.raises(ValueError, match="train-other-500 not prepared"):
        write_recipe_manifests(prepared, tmp_path / "data", ["train-other-500"])


@pytest.mark.parametrize("name, kind", [("conformer_xl_transducer.yaml", "transducer"), ("finetune_ctc_xl.yaml", "ctc")])
def test_librispeech_yaml_builds_the_paper_model_on_the_meta_device(tmp_path, name, kind):
    """The shipped YAML, unmodified but for paths: Conformer XL (~600 M parameters), 1,024 outputs."""
    fake = {"output_folder": str(tmp_path / "exp"), "tokenizer": None, "data_folder": str(tmp_path)}
    if name.startswith("finetune"):
        fake["pretrained_encoder"] = None
    with torch.device("meta"):
        hparams = load_hyperpyyaml((ASR_HPARAMS / name).read_text(), fake)
    model = hparams["model"]
    assert hparams["model_size"] == "XL" and hparams["model_kind"] == kind and hparams["vocab_size"] == 1024
    assert next(model.parameters()).device.type == "meta"
    assert count_parameters(model.encoder) == pytest.approx(0.6e9, rel=0.1)
    assert count_parameters(model) > count_parameters(model.encoder)


def test_librispeech_dp_recipe_one_step_end_to_end(tmp_path):
    """run_dp.sh on fabricated LibriSpeech + Libri-Light: manifests, tokenizer, one DP-SGD step of
    BEST-RQ on Libri-Light (after the public warm-start and LayerFreeze), CTC fine-tuning on
    LibriSpeech from that encoder, and RESULTS.md with WER and epsilon."""
    corpus = fabricate_librispeech(tmp_path, ["train-clean-100", "dev-clean", "test-clean"])
    librilight = fabricate_librilight(tmp_path / "librilight")
    data, exp = tmp_path / "data", tmp_path / "exp"
    args = ["--librispeech_root", str(corpus), "--librilight_root", str(librilight), "--librilight_subsets", "small",
            "--train_splits", "train-clean-100", "--data", str(data), "--exp", str(exp), "--model_size", "tiny",
            "--vocab_size", "20",
            "--pretrain_args", "--codebook_size 64 --warm_start_batch_size 1 --dp_batch_size 5 --number_of_epochs 1 "
                               "--target_epsilon null --noise_seed 0 --core_grad_mode loop --num_workers 0",
            "--train_args", "--number_of_epochs=1 --batch_size=4 --train_eval_size=4 --num_workers=0"]
    result = run(*args, script=RUN_DP)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    privacy = json.loads((exp / "pretrain" / "privacy.json").read_text())
    assert privacy["steps"] == 1 and privacy["delta"] == 1e-9 and privacy["frozen_layers"]
    assert len((data / "librilight.csv").read_text().splitlines()) == 1 + 6
    assert "epoch: 1" in (exp / "finetune" / "train_log.txt").read_text()
    results = (exp / "RESULTS.md").read_text()
    assert f"{privacy['epsilon']:.3g}" in results
    # re-running redoes nothing: the manifests are not rewritten, every stage says it is done
    stamp = (data / "train.csv").stat().st_mtime_ns
    again = run(*args, script=RUN_DP)
    assert again.returncode == 0, again.stderr[-2000:]
    for done in ("DP pre-training already done", "fine-tuning 'finetune' already done"):
        assert done in again.stdout, again.stdout[-2000:]
    assert (data / "train.csv").stat().st_mtime_ns == stamp


def test_librispeech_dp_recipe_needs_librilight(tmp_path):
    result = run("--librispeech_root", str(tmp_path), script=RUN_DP)
    assert result.returncode == 2 and "--librilight_root" in result.stderr and "Traceback" not in result.stderr
