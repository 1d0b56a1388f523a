"""The benchmarks run end to end on a tiny model (their figures are measured by hand, not asserted here)."""
import json

import pytest

from tools import bench_clipping, bench_dp

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
