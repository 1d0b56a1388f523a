"""A finished DP pre-training is skipped only when made with the current settings (train.py --check_only,
egs/lib/dp_stages.sh's stage_dp_pretrain), and refused in one line naming the keys that differ otherwise."""
import importlib.util
import os
import subprocess
from pathlib import Path

from privasr.cli import run_cli
from privasr.cli.hparams import load_hparams, parse_arguments
from privasr.provenance import claim_run_folder, record_run

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/mini_tts/SSL/bestrq"
YAML = RECIPE / "hparams/bestrq_dp_quick.yaml"


def recipe_main():
    spec = importlib.util.spec_from_file_location("bestrq_train", RECIPE / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def finished_pretraining(tmp_path):
    """A pre-training folder as a finished run leaves it: fingerprint.json (recorded as train.py records it),
    an exported encoder, .done; and a corpus whose manifests the fingerprint digests."""
    data, out = tmp_path / "data", tmp_path / "exp" / "pretrain"
    data.mkdir()
    (data / "train.csv").write_text("ID,duration,wav\nu1,1.0,u1.wav\n")
    (data / "dev.csv").write_text("ID,duration,wav\nd1,1.0,d1.wav\n")
    argv = [str(YAML), "--output_folder", str(out), "--data_folder", str(data), "--model_size", "tiny"]
    hparams_file, run_opts, overrides = parse_arguments(argv)
    out.mkdir(parents=True)
    record_run(out, claim_run_folder(load_hparams(hparams_file, overrides), run_opts))
    (out / "encoder.ckpt").write_bytes(b"the exported encoder")
    (out / ".done").touch()
    (out / "train.log").write_text("(8, 1e-05)-DP after 3 DP-SGD steps; encoder: encoder.ckpt\n")
    return data, out, argv


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


def test_check_only_accepts_the_same_settings_and_refuses_others_writing_nothing(tmp_path, capsys):
    _, out, argv = finished_pretraining(tmp_path)
    main, before = recipe_main(), snapshot(out)
    assert run_cli(main, argv + ["--check_only", "true"], prog="bestrq/train.py") == 0
    assert "a pre-training with these settings" in capsys.readouterr().out

    status = run_cli(main, argv + ["--noise_multiplier", "2.5", "--check_only=true"], prog="bestrq/train.py")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith("bestrq/train.py: error: ") and "holds a run made with other settings" in lines[0]
    assert "settings.noise_multiplier: " in lines[0] and "2.5 here" in lines[0]

    assert snapshot(out) == before  # nothing trained, exported or written


def test_check_only_refuses_a_folder_without_a_record_and_a_bad_value(tmp_path, capsys):
    main = recipe_main()
    argv = [str(YAML), "--output_folder", str(tmp_path / "new"), "--data_folder", str(tmp_path)]
    assert run_cli(main, argv + ["--check_only", "true"], prog="bestrq/train.py") == 2
    assert "holds no recorded pre-training (no fingerprint.json)" in capsys.readouterr().err
    assert run_cli(main, argv + ["--check_only", "yes"], prog="bestrq/train.py") == 2
    assert "--check_only expects true or false, got 'yes'" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def run_stage_3(data, exp, *extra):
    cmd = [str(ROOT / "egs/mini_tts/run_dp.sh"), "--quick", "true", "--data", str(data), "--exp", str(exp),
           "--stage", "3", "--stop_stage", "3", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_stage_3_skips_only_a_pretraining_made_with_these_settings(tmp_path):
    data, out, _ = finished_pretraining(tmp_path)
    before = snapshot(out / "..")
    same = run_stage_3(data, tmp_path / "exp")
    assert same.returncode == 0, same.stderr
    assert "DP pre-training already done with these settings" in same.stdout

    other = run_stage_3(data, tmp_path / "exp", "--pretrain_args", "--noise_multiplier 2.5")
    errors = [line for line in other.stderr.splitlines() if line.strip()]
    assert other.returncode == 2 and len(errors) == 1, other.stderr
    assert errors[0].startswith("run_dp.sh: error: ") and "settings.noise_multiplier" in errors[0]
    assert "already done" not in other.stdout
    after = snapshot(out / "..")
    assert {k: v for k, v in after.items() if k.name != "check.log"} == before  # encoder.ckpt untouched
