"""The benchmarks run end to end on a tiny model (their figures are measured by hand, not asserted here)."""
import json

import pytest

from privasr.cli import bench_clipping, bench_dp

TINY = ["--nproc", "2", "--batch", "2", "--seconds", "0.5", "--tokens", "4", "--d-model", "32", "--layers", "1",
        "--heads", "2", "--steps", "1", "--warmup", "0"]


def test_clipping_bench_prints_ratios_to_none(tmp_path, capsys):
    bench_clipping.main([*TINY, "--strategies", "ddp", "pcc", "--json", str(tmp_path / "b.json")])
    table = capsys.readouterr().out
    assert "| none |" in table and "| 1.00x |" in table and "| ddp |" in table and "| pcc |" in table
    results = json.load(open(tmp_path / "b.json"))["results"]
    assert set(results) == {"none", "ddp", "pcc"}
    assert all(r["median_s"] > 0 and r["peak_bytes"] >= 0 for r in results.values())


def test_dp_bench_runs_a_dp_row(capsys):
    bench_dp.main([*TINY, "--rows", "dp-dim-freeze"])
    assert "| dp-dim-freeze |" in capsys.readouterr().out


def test_unknown_strategy_is_refused():
    with pytest.raises(SystemExit):
        bench_clipping.parse_args(["--strategies", "pcc-vx"])


def test_recipe_bench_times_the_real_step_with_and_without_speedups(tmp_path, tmp_path_factory, capsys):
    """privasr-bench-recipe on the quick corpus: a row per (method, speed-ups), ratios to plain, one JSON."""
    from privasr.cli import bench_recipe

    from .fault_injection import HAVE_TTS, quick_corpus

    if not HAVE_TTS:
        pytest.skip("needs espeak-ng, flite and sox")
    data = quick_corpus(tmp_path_factory.getbasetemp())  # made once per session, shared with test_bad_input
    status = bench_recipe.main(["--data", str(data), "--methods", "pcc", "--configs", "plain", "all", "--steps", "1",
                                "--warmup", "0", "--repeats", "1", "--batch-size", "4", "--virtual-cores", "2",
                                "--model-size", "tiny", "--threads", "1", "--json", str(tmp_path / "r.json")])
    assert status == 0
    out = capsys.readouterr().out
    assert "| pcc | plain |" in out and "| 1.00 |" in out and "| pcc | all |" in out
    cells = json.load(open(tmp_path / "r.json"))["cells"]["pcc"]
    assert all(cell[0]["utt_per_s"] > 0 and cell[0]["peak_mb"] > 0 for cell in cells.values())


def test_recipe_bench_refuses_a_folder_without_a_corpus(tmp_path, capsys):
    from privasr.cli import bench_recipe

    assert bench_recipe.main(["--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("privasr-bench-recipe: error: ") and "train.csv not found" in err[0]

