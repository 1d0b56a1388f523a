"""The benchmarks run end to end on a tiny model (their figures are measured by hand, not asserted here)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

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


# -- a worker that dies; the row's process group really ending -----------------------------------
ONE = [*TINY[2:], "--nproc", "1"]  # TINY on one process: a row is one spawned worker


def _abort_worker(rank, *args):  # spawned by reference (tests.test_bench._abort_worker): a C++ abort's signal
    os.abort()


def _raising_worker(rank, *args):
    raise RuntimeError("the row's all_reduce failed (test)")


def test_a_worker_killed_by_a_signal_ends_the_bench_in_one_line_status_1(monkeypatch, capfd):
    monkeypatch.setattr(bench_dp, "_worker", _abort_worker)  # measure() spawns whatever _worker is now
    assert bench_dp.main([*ONE, "--rows", "dp-flat-ghost"]) == 1
    captured = capfd.readouterr()  # the file descriptors: the spawned process's stderr too
    assert "Traceback" not in captured.err and "| none |" not in captured.out
    errors = [line for line in captured.err.splitlines() if "error" in line]
    assert errors == [("privasr-bench-dp: error: row none: worker process 0 of 1 was killed by SIGABRT "
                       "(its own message, if it wrote one, is above)")]


def test_a_worker_exception_ends_the_bench_in_one_line_status_1(monkeypatch, capfd):
    monkeypatch.setattr(bench_clipping, "_worker", _raising_worker)
    assert bench_clipping.main([*ONE, "--strategies", "pcc"]) == 1
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err
    errors = [line for line in captured.err.splitlines() if "error" in line]
    assert errors == [("privasr-bench: error: row none: worker process 0 of 1 raised RuntimeError: the row's "
                       "all_reduce failed (test)")]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists the process's threads in /proc")
def test_a_rows_process_group_and_its_threads_end_with_the_row():
    """After a row's worker returns, none of its process group's threads (gloo's, the store server's) is left.

    A group left alive past destroy_process_group runs its threads into the interpreter's finalization
    and exit() (the likely cause of privasr-bench-dp's rare SIGABRT at a row's end). The step's optimizer, made after
    init_process_group, imports torch.distributed.nn (through torch._dynamo), whose default arguments
    would hold the group; so this runs in a fresh interpreter, where nothing imported it before.
    """
    code = textwrap.dedent(f"""
        import glob, json, tempfile
        from privasr.cli import bench_clipping

        def threads():
            return {{(p, open(p + "/comm").read().strip()) for p in glob.glob("/proc/self/task/*")}}

        args = bench_clipping.parse_args({[*ONE, "--strategies", "none"]!r})
        before = threads()
        with tempfile.TemporaryDirectory() as tmp:
            bench_clipping._worker(0, 1, bench_clipping._free_port(), args, "none", tmp + "/result.json")
            assert json.load(open(tmp + "/result.json"))["median_s"] > 0
        print(json.dumps(sorted(name for _, name in threads() - before)))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          check=False, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [], "threads left alive after the row's shutdown"
