"""Multi-process runs end in order: :func:`privasr.distributed.shutdown_process_group`.

A finished rank waits at the barrier for a slow one (rank 0 decoding alone), a failed rank does
not wait and its peer does not hang, the group is destroyed on every path (``run_cli`` included),
and real 2-process torchrun trainings through ``run_cli`` end with status 0 and no abort at
teardown, three of them side by side (``tools/stress_ddp.sh`` repeats the whole recipe for longer).

Run by torchrun, this module is that training: ``torchrun --nproc_per_node 2 -m tests.test_stress_ddp OUT``.
"""
import contextlib
import json
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from privasr.distributed import CoreAccumulator, shutdown_process_group, world_info
from privasr.cli import USER_ERRORS, run_cli
from privasr.cli.hparams import RECIPE_ERRORS
from privasr.errors import NonFiniteGradientsError, UserError
from privasr.per_sample import shard_grads_loop

from .ddp_utils import free_port, run_processes
from .fault_injection import start_python
from .toy import mse_loss_fn, toy_batch, toy_model

SLOW = 2.0  # seconds rank 0 works alone before it reaches the end


def _one_process_group(path):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)


def test_without_a_group_shutdown_does_nothing():
    assert not dist.is_initialized()
    assert shutdown_process_group() is False
    assert shutdown_process_group(failed=True) is False


def test_shutdown_destroys_the_group_once(tmp_path):
    _one_process_group(tmp_path / "store")
    assert shutdown_process_group() is True
    assert not dist.is_initialized()
    assert shutdown_process_group() is False  # idempotent: the helpers and run_cli may both call it


@pytest.mark.parametrize("raises, user_errors, status", [
    (None, RECIPE_ERRORS, 0), (UserError("bad input"), RECIPE_ERRORS, 2), (SystemExit(0), RECIPE_ERRORS, 0),
    (NonFiniteGradientsError("diverged"), RECIPE_ERRORS, 1), (KeyboardInterrupt(), RECIPE_ERRORS, 130),
    (RuntimeError("bug"), RECIPE_ERRORS, None), (RuntimeError("bad device"), USER_ERRORS, 2),
], ids=["ok", "user-error", "help", "diverged", "interrupted", "recipe-bug", "tool-runtime-error"])
def test_run_cli_destroys_the_group_on_every_path(tmp_path, raises, user_errors, status, capsys):
    def main(argv):
        _one_process_group(tmp_path / "store")
        if raises is not None:
            raise raises

    if status is None:  # a recipe's bug: the traceback propagates, the group is gone all the same
        with pytest.raises(RuntimeError, match="bug"):
            run_cli(main, [], prog="train.py", user_errors=user_errors)
    else:
        assert run_cli(main, [], prog="train.py", user_errors=user_errors) == status
    assert not dist.is_initialized()
    if status in (1, 2):
        assert capsys.readouterr().err == f"train.py: error: {raises}\n"


def _two_endings(rank, world_size, out):
    """1: rank 0 works alone, both finish; 2 (a second group): rank 1 fails, rank 0 finishes late."""
    times = {}
    if rank == 0:
        time.sleep(SLOW)  # rank 0 decoding while rank 1 is done
    times["ok_arrived"] = time.time()
    assert shutdown_process_group() is True
    times["ok_left"], times["ok_initialized"] = time.time(), dist.is_initialized()

    dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank, world_size=world_size)
    if rank == 0:
        time.sleep(SLOW)
    times["failed_arrived"] = time.time()
    if rank == 1:  # failed: must not wait at a barrier its peer may never reach
        shutdown_process_group(failed=True)
    else:  # its peer never arrives: gives up after the timeout, destroys anyway
        shutdown_process_group(timeout=timedelta(seconds=1))
    times["failed_left"], times["failed_initialized"] = time.time(), dist.is_initialized()
    torch.save(times, f"{out}.{rank}")


def test_a_group_destroyed_after_an_optimizer_leaves_no_thread_behind(tmp_path):
    """The recipes' order (privasr.distributed imported, group made, then the first optimizer) frees the group.

    torch.optim imports torch.distributed.nn at the first optimizer (through torch._dynamo); imported after the
    group exists, its ``group=WORLD`` default arguments would hold the group past destroy_process_group, and its
    gloo and store threads would run into interpreter exit (a rare SIGABRT). privasr.distributed imports it
    first; a fresh interpreter, since this one imported it long ago.
    """
    code = f"""
import glob, json
import torch, torch.distributed as dist
from privasr.distributed import shutdown_process_group

def threads():
    return {{(p, open(p + "/comm").read().strip()) for p in glob.glob("/proc/self/task/*")}}

before = threads()
dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
model = torch.nn.Linear(3, 2)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
model(torch.ones(1, 3)).sum().backward()
optimizer.step()
assert shutdown_process_group() is True
print(json.dumps(sorted(name for _, name in threads() - before)))
"""
    done = start_python("-c", code).communicate(timeout=120)
    assert json.loads(done[0].strip().splitlines()[-1]) == [], f"threads left alive after the shutdown: {done}"


def test_finished_ranks_meet_and_a_failed_rank_does_not_wait(tmp_path):
    out = str(tmp_path / "times")
    run_processes(_two_endings, 2, out)
    r0, r1 = (torch.load(f"{out}.{r}") for r in range(2))
    assert r1["ok_left"] >= r0["ok_arrived"]  # rank 1 closed only once rank 0 had finished its work
    assert r1["failed_left"] < r0["failed_arrived"]  # the failed rank 1 was gone before rank 0 got there
    assert r0["failed_left"] - r0["failed_arrived"] >= 1.0  # rank 0 waited its timeout, and no hang
    assert not any(r[k] for r in (r0, r1) for k in ("ok_initialized", "failed_initialized"))


# -- real torchrun: a tiny PCC training (2 processes x 2 virtual cores) through run_cli, three times ------
def _tiny_training(argv):
    dist.init_process_group("gloo")
    rank, world_size = world_info()
    model, (x, y) = toy_model(), toy_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    half = x.shape[0] // world_size
    mine = (x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
    for _ in range(3):
        accumulator = CoreAccumulator(list(model.parameters()), "pcc", 5.0)
        for grads, _ in shard_grads_loop(model, mse_loss_fn(model), mine, 2):
            accumulator.add_core(grads)
        for param, grad in zip(model.parameters(), accumulator.reduce()[0]):
            param.grad = grad
        optimizer.step()
    gathered = [None] * world_size
    dist.all_gather_object(gathered, torch.cat([p.detach().flatten() for p in model.parameters()]))
    if rank == 0:  # rank 0 alone at the end (the recipe decodes there) while rank 1 is done
        time.sleep(0.5)
        torch.save(gathered, argv[0])


def test_three_real_two_process_trainings_end_cleanly(tmp_path):
    """torchrun, 2 gloo processes, run_cli as in the recipes: status 0, no abort at teardown; three trainings, side
    by side (each its own torchrun and port: three independent teardowns, in the time of about two)."""
    with contextlib.ExitStack() as held:  # three distinct free ports: each held until all three are chosen
        ports = [free_port(held) for _ in range(3)]
    runs = [start_python("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                         "-m", "tests.test_stress_ddp", tmp_path / f"params{attempt}.pt")
            for attempt, port in enumerate(ports)]
    try:
        for attempt, proc in enumerate(runs):
            _, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, (attempt, stderr[-3000:])
            assert "terminate called" not in stderr and "SIGABRT" not in stderr, stderr[-3000:]
            params = torch.load(tmp_path / f"params{attempt}.pt")
            assert torch.equal(params[0], params[1])  # both ranks took the same three steps
    finally:  # a failed or hung run leaves no torchrun behind
        for proc in runs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


if __name__ == "__main__":
    sys.exit(run_cli(_tiny_training, sys.argv[1:], prog="test_stress_ddp"))
