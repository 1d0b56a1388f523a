"""BEST-RQ DP pre-training recipes: data split, encoder hand-over, the XL config, and the quick run end to end."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from hyperpyyaml import load_hyperpyyaml

from privasr.accounting import epsilon
from privasr.models import build_model, count_parameters, get_size
from privasr.ssl import (
    DPBestRQBrain,
    audio_dataset,
    build_encoder,
    export_encoder,
    load_pretrained_encoder,
    read_audio_manifest,
    split_public_private,
)
from privasr.ssl.results import read_wer

from .conftest import REPO_ROOT, requires_tts

XL_YAML = REPO_ROOT / "recipes/LibriSpeech/SSL/bestrq/hparams/bestrq_dp_xl.yaml"


def fabricate_audio(folder: Path, count: int, with_text: bool = False, seed: int = 0) -> Path:
    """``count`` noisy chirps of 1.0-1.6 s at 16 kHz and their manifest (audio-only unless ``with_text``)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["ID,duration,wav" + (",spk_id,wrd" if with_text else "")]
    for i in range(count):
        n = int(16000 * (1.0 + 0.6 * i / max(count - 1, 1)))
        t = np.arange(n) / 16000
        wav = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.05 * rng.standard_normal(n)
        path = folder / f"u{i}.wav"
        soundfile.write(path, wav.astype(np.float32), 16000)
        lines.append(f"u{i},{n / 16000:.4f},{path}" + (",s0,HELLO WORLD" if with_text else ""))
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


# -- data ------------------------------------------------------------------------------------
def test_public_private_split_is_disjoint_seeded_and_at_least_one(tmp_path):
    rows = read_audio_manifest(str(fabricate_audio(tmp_path, 12)))
    public, private = split_public_private(rows, 0.01, seed=3)
    assert len(public) == 1 and len(private) == 11
    assert {r["ID"] for r in public}.isdisjoint(r["ID"] for r in private)
    assert split_public_private(rows, 0.01, seed=3) == (public, private)
    assert split_public_private(rows, 0.0)[0] == []
    with pytest.raises(ValueError, match="public_fraction must be in"):
        split_public_private(rows, 1.0)
    assert len(read_audio_manifest(str(tmp_path / "manifest.csv"), max_duration=1.3)) < 12
    sig = audio_dataset(rows)[0]["sig"]
    assert sig.dtype == torch.float32 and sig.dim() == 1


# -- the encoder from pre-training to fine-tuning ----------------------------------------------
def test_pretrained_encoder_loads_into_the_ctc_model(tmp_path):
    torch.manual_seed(0)
    path = export_encoder(build_encoder("tiny"), str(tmp_path / "encoder.ckpt"))
    model = load_pretrained_encoder(build_model("tiny", vocab_size=30), path)
    saved = torch.load(path)
    for name, p in model.encoder.named_parameters():
        assert torch.equal(p, saved[name]), name
    assert load_pretrained_encoder(model, None) is model
    with pytest.raises(ValueError, match="does not fit the model's encoder"):
        load_pretrained_encoder(build_model("mini", vocab_size=30), path)
    with pytest.raises(ValueError, match="pre-trained encoder not found"):
        load_pretrained_encoder(model, str(tmp_path / "missing.ckpt"))


# -- the LibriSpeech / Libri-Light XL configuration ---------------------------------------------
def test_xl_config_builds_the_conformer_xl_encoder_on_the_meta_device(tmp_path):
    with torch.device("meta"):
        hparams = load_hyperpyyaml(XL_YAML.read_text(), {"output_folder": str(tmp_path)})
    bestrq = hparams["bestrq"]
    xl = get_size("XL")
    assert bestrq.encoder.d_model == xl["d_model"] and len(bestrq.encoder.conformer.layers) == xl["num_layers"]
    assert count_parameters(bestrq.encoder) == pytest.approx(0.635e9, rel=0.01)
    assert bestrq.head.out_features == 8192
    assert (hparams["delta"], hparams["target_epsilon"], hparams["dp_clip_mode"]) == (1e-9, 10.0, "dim")
    assert hparams["public_fraction"] == 0.01


@pytest.mark.parametrize("grad_mode", ["vmap", "ghost"])
def test_xl_config_takes_one_warm_start_and_one_dp_step_on_fabricated_audio(tmp_path, grad_mode):
    """XL is too big to step on 2 CPU cores (0.64 B parameters, a gradient per example): the very
    same YAML runs with the tiny encoder and a 64-code head, everything else as configured. Ghost mode
    clips BEST-RQ's per-example losses (BestRQBrain.example_losses) without per-example gradients."""
    manifest = fabricate_audio(tmp_path / "audio", 6)
    overrides = {"output_folder": str(tmp_path / "exp"), "train_csv": str(manifest), "valid_csv": str(manifest),
                 "model_size": "tiny", "codebook_size": 64, "warm_start_batch_size": 1, "dp_batch_size": 5,
                 "number_of_epochs": 1, "target_epsilon": None, "noise_seed": 0, "core_grad_mode": grad_mode,
                 "num_workers": 0}
    hparams = load_hyperpyyaml(XL_YAML.read_text(), overrides)
    public, private = split_public_private(read_audio_manifest(str(manifest)), hparams["public_fraction"])
    brain = DPBestRQBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                          run_opts={"device": "cpu"}, checkpointer=hparams["checkpointer"])
    frozen = brain.public_warm_start(audio_dataset(public), hparams["warm_start_dataloader_opts"], progressbar=False)
    assert brain.freezer.steps == 1 and len(frozen) == 1  # floor(0.25 * 4 candidate layers); the head is excluded
    before = {n: p.detach().clone() for n, p in brain.modules.named_parameters()}
    brain.fit(hparams["epoch_counter"], audio_dataset(private), train_loader_kwargs=hparams["train_dataloader_opts"],
              progressbar=False)
    assert brain.ledger.steps == 1 and brain.sample_rate == 1.0  # q = 5/5: one Poisson step per epoch
    changed = [n for n, p in brain.modules.named_parameters() if not torch.equal(p, before[n])]
    trained = [n for n, p in brain.modules.named_parameters() if p.requires_grad]
    assert changed == trained  # the frozen layer (and the frozen quantizer) stayed bit-identical
    summary = json.loads((tmp_path / "exp" / "privacy.json").read_text())
    assert summary["epsilon"] == epsilon(1.0, hparams["noise_multiplier"], 1, 1e-9)


# -- the quick recipe end to end ---------------------------------------------------------------
@requires_tts
def test_quick_recipe_pretrains_finetunes_and_reports_wer_with_epsilon(tmp_path):
    data, exp = tmp_path / "data", tmp_path / "exp"
    cmd = [str(REPO_ROOT / "egs/mini_tts/run_dp.sh"), "--quick", "true", "--data", str(data), "--exp", str(exp)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    privacy = json.loads((exp / "pretrain" / "privacy.json").read_text())
    assert privacy["epsilon"] == epsilon(privacy["sample_rate"], privacy["noise_multiplier"], privacy["steps"],
                                         privacy["delta"])
    assert privacy["steps"] == 7 and privacy["frozen_layers"]  # one tiny layer frozen after the warm-start
    assert json.loads((exp / "pretrain" / "freeze.json").read_text())["frozen"] == privacy["frozen_layers"]
    results = (exp / "RESULTS.md").read_text()
    test_wer = read_wer(exp / "finetune" / "hyps" / "test.csv")
    assert f"| dp | BEST-RQ, DP-SGD | {privacy['epsilon']:.3g} | 1e-05 |" in results
    assert f"{test_wer:.2f} |" in results
    assert (exp / "pretrain" / "encoder.ckpt").is_file()
    again = subprocess.run(cmd + ["--stage", "3"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already done" in again.stdout  # resumable: nothing is redone


def test_run_dp_refuses_unknown_options():
    proc = subprocess.run([str(REPO_ROOT / "egs/mini_tts/run_dp.sh"), "--noise", "1"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown option --noise" in proc.stderr
    proc = subprocess.run([str(REPO_ROOT / "egs/mini_tts/run_dp.sh"), "--quick", "yes"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--quick takes true or false" in proc.stderr


def test_ssl_train_py_refuses_a_mistyped_option_in_one_line(tmp_path):
    script = REPO_ROOT / "recipes/mini_tts/SSL/bestrq/train.py"
    yaml = REPO_ROOT / "recipes/mini_tts/SSL/bestrq/hparams/bestrq_dp_quick.yaml"
    proc = subprocess.run([sys.executable, str(script), str(yaml), "--noise_multiplir", "1.0",
                           "--output_folder", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "bestrq/train.py: error: unknown option --noise_multiplir: bestrq_dp_quick.yaml has no such key "
        "(did you mean --noise_multiplier?)"]
    assert not (tmp_path / "out").exists()
