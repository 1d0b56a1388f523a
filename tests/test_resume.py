"""Exact resumption: SIGKILL anywhere, re-run the same command, get the uninterrupted run's model bit for bit."""
import glob
import os
import random

import numpy as np
import pytest
import speechbrain as sb
import torch

from privasr.resume import PARTIAL_PREFIX, AtomicCheckpointer, capture_rng_state, make_atomic, restore_rng_state

from .fault_injection import (HAVE_TTS, LAUNCHER, TOY_TRAIN, kill_argv, quick_corpus, recipe_argv,
                              start_python)
from .toy import make_toy_brain

KILLED = -9  # subprocess.returncode of a process that died of SIGKILL


def final(out) -> dict:
    return torch.load(os.path.join(out, "final.pt"))


# -- unit level -----------------------------------------------------------------------------
def test_rng_states_round_trip():
    state = capture_rng_state()
    first = (random.random(), float(np.random.rand()), torch.rand(3))
    restore_rng_state(state)
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_checkpoints_are_published_whole_and_leftovers_removed(tmp_path):
    counter = sb.utils.epoch_loop.EpochCounter(5)
    ckpt = AtomicCheckpointer(tmp_path / "save", recoverables={"counter": counter})
    assert not (tmp_path / "save").exists()  # nothing written until the first save
    next(iter(counter))
    ckpt.save_checkpoint(end_of_epoch=True)
    partial = tmp_path / "save" / (PARTIAL_PREFIX + "CKPT+killed")
    partial.mkdir()
    (partial / "CKPT.yaml").write_text("end-of-epoch: true\n")  # what a save killed mid-way leaves
    counter.current = 0
    assert ckpt.recover_if_possible() is not None and counter.current == 1
    assert not partial.exists() and len(ckpt.list_checkpoints()) == 1


def test_plain_checkpointer_is_made_atomic(tmp_path):
    plain = sb.utils.checkpoints.Checkpointer(tmp_path)
    assert isinstance(make_atomic(plain), AtomicCheckpointer)


def test_no_intra_epoch_checkpoint_inside_gradient_accumulation():
    brain = make_toy_brain(dict(clipping="pcc", clip_bound=1.0, virtual_cores=2),
                           run_opts={"grad_accumulation_factor": 2, "ckpt_interval_steps": 1})
    brain.checkpointer = object()  # anything not None
    brain.step = 1
    assert not brain._should_save_intra_epoch_ckpt(0.0, 1)
    brain.step = 2
    assert brain._should_save_intra_epoch_ckpt(0.0, 1)


def test_ckpt_interval_steps_replaces_minutes():
    brain = make_toy_brain(dict(clipping="none", ckpt_interval_minutes=2),
                           run_opts={"ckpt_interval_steps": 3})
    assert brain.ckpt_interval_steps == 3 and brain.ckpt_interval_minutes == 0


# -- process level --------------------------------------------------------------------------
def test_toy_run_killed_four_times_ends_bit_identical(tmp_path, warm_python):
    """SIGKILL mid-epoch, at an epoch's first step, during a checkpoint save, right after one; then finish.

    The uninterrupted reference is a plain interpreter; the killed and resumed runs are fresh processes forked
    from one that imported torch and SpeechBrain once (WarmPython: 5 starts, not 5 imports)."""
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    reference = start_python(TOY_TRAIN, uninterrupted)  # the uninterrupted run, beside the killed ones
    starts = []
    for step, point in ((3, "step"), (5, "step"), (6, "save"), (7, "saved")):  # 4 steps an epoch, 2 epochs
        proc = warm_python.run(LAUNCHER, *kill_argv(step, point), "--", TOY_TRAIN, resumed)
        assert proc.returncode == KILLED, proc.stderr[-3000:]
        assert "SIGKILL rank 0" in proc.stderr
        starts.append(proc.stdout.split("starts at optimizer step ")[1].split()[0])
    proc = warm_python.run(TOY_TRAIN, resumed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, stderr = reference.communicate(timeout=300)
    assert reference.returncode == 0, stderr[-3000:]
    # resumed from: nothing, step 2 (intra-epoch), 4 (end of epoch 1), 5 (the save of 6 was never published), 7
    assert starts == ["0", "2", "4", "5"] and "starts at optimizer step 7" in proc.stdout
    expected, got = final(uninterrupted), final(resumed)
    assert torch.equal(expected["params"], got["params"])
    assert expected["optimizer_step"] == got["optimizer_step"] == 8
    assert not glob.glob(str(resumed / "save" / (PARTIAL_PREFIX + "*")))


@pytest.mark.skipif(not HAVE_TTS, reason="needs espeak-ng, flite and sox")
def test_recipe_killed_mid_epoch_resumes_to_the_same_model(tmp_path_factory, warm_python):
    """The mini_tts recipe (SpecAugment, dropout, shuffled data, Adam): kill in epoch 2, re-run, same model.
    The reference is a plain interpreter, the killed and resumed runs WarmPython's forked processes."""
    data = quick_corpus(tmp_path_factory.getbasetemp())
    work = tmp_path_factory.mktemp("recipe_resume")
    args = ("--number_of_epochs", "2", "--batch_size", "4", "--virtual_cores", "2", "--ckpt_interval_steps", "1")
    reference = start_python(*recipe_argv(data, work / "uninterrupted", *args))  # beside the killed run
    proc = warm_python.run(LAUNCHER, *kill_argv(6), "--", *recipe_argv(data, work / "resumed", *args))
    _, stderr = reference.communicate(timeout=300)
    assert reference.returncode == 0, stderr[-3000:]
    assert proc.returncode == KILLED, proc.stdout[-2000:] + proc.stderr[-2000:]
    proc = warm_python.run(*recipe_argv(data, work / "resumed", *args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Loading a checkpoint from" in proc.stdout
    for name in ("model", "optimizer"):
        expected, got = (torch.load(glob.glob(str(work / run / "save" / "CKPT*" / f"{name}.ckpt"))[0])
                         for run in ("uninterrupted", "resumed"))
        flat = (lambda sd: sd if name == "model" else {f"{i}.{k}": v for i, s in sd["state"].items()
                                                      for k, v in s.items()})
        assert flat(expected).keys() == flat(got).keys()
        for key, value in flat(expected).items():
            assert torch.equal(value, flat(got)[key]), (name, key)
