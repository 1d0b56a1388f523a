"""privasr-bench-ghost's grid, table and memory count (the cells themselves: tests/test_ghost.py)."""
import json
import subprocess

import pytest
import torch

from privasr.cli import bench_ghost
from privasr.cli.bench_ghost import main, markdown, plan, tensor_bytes


def test_tensor_bytes_counts_the_live_tensors():
    def two_then_one():
        a = torch.ones(1000, 250)  # 1,000,000 bytes
        b = torch.ones(500, 250)  # 500,000 bytes
        del a
        return b

    peak, net, kept = tensor_bytes(two_then_one)
    assert (peak, net) == (1_500_000, 500_000) and kept.shape == (500, 250)


def test_plan_runs_none_first_in_every_size_and_batch_and_repeats_the_grid():
    cells = plan(["tiny", "mini"], [8, 16], ["ghost", "vmap"], rounds=2)
    assert len(cells) == 2 * 2 * 2 * 3
    assert cells[:3] == [(0, "tiny", 8, "none"), (0, "tiny", 8, "ghost"), (0, "tiny", 8, "vmap")]
    assert cells[12] == (1, "tiny", 8, "none")


def row(mode, time_s, mib, rnd=0, size="mini", batch=16):
    return {"mode": mode, "size": size, "batch": batch, "time_s": time_s, "cpu_s": time_s / 2, "extra_mib": mib,
            "tensor_mib": mib / 2, "round": rnd}


def test_markdown_gives_ratios_to_none_of_the_same_round_with_their_range():
    rows = [row("none", 1.0, 100, 0), row("ghost", 1.2, 130, 0),
            row("none", 2.0, 100, 1), row("ghost", 2.2, 110, 1),  # a slower round: its own none
            row("none", 1.0, 100, 2), row("ghost", 1.1, 120, 2)]
    lines = markdown(rows).splitlines()
    assert len(lines) == 4
    ghost = [c.strip() for c in lines[3].strip("|").split("|")]
    assert ghost[:4] == ["mini", "16", "ghost", "1.200"]  # median time
    assert ghost[4] == "1.10 (1.10-1.20)"  # 1.2, 1.1, 1.1: median and range
    assert ghost[8] == "60.0" and ghost[9] == "1.20 (1.10-1.30)"
    with pytest.raises(ValueError, match="no 'none' cell for size mini batch 8"):
        markdown([row("ghost", 1.0, 1.0, batch=8)])


def test_quick_runs_every_mode_once_in_fresh_processes(monkeypatch, capsys):
    calls = []

    def fake_run(cmd, capture_output, text):
        calls.append(cmd)
        mode, size, batch = cmd[cmd.index("--cell") + 1:cmd.index("--cell") + 4]
        cell = row(mode, 1.0 if mode == "none" else 1.5, 10.0, size=size, batch=int(batch))
        return subprocess.CompletedProcess(cmd, 0, json.dumps({k: v for k, v in cell.items() if k != "round"}), "")

    monkeypatch.setattr(bench_ghost.subprocess, "run", fake_run)
    assert main(["--quick"]) == 0
    assert [c[c.index("--cell") + 1] for c in calls] == ["none", "vmap", "loop", "ghost"]
    assert all(c[c.index("--cell") + 2:c.index("--cell") + 4] == ["tiny", "2"] for c in calls)
    assert all(c[c.index("--seconds") + 1] == "0.3" and c[c.index("--repeats") + 1] == "1" for c in calls)
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 2 + 4 and "| tiny | 2 | ghost | 1.500 | 1.50 |" in table[-1]


def test_an_unknown_size_is_one_line():
    assert main(["--sizes", "XXL"]) == 2
