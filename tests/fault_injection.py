"""Fault injection for the tests: kill a worker at step k, corrupt a file, NaN in one core's gradient.

As a launcher, it wraps any privasr training script (a recipe's ``train.py``, ``tests/toy_train.py``),
also under torchrun, installs the requested faults, then runs the script as ``__main__``::

    python tests/fault_injection.py --kill-at 3 -- recipes/.../train.py hparams.yaml ...
    torchrun --nproc_per_node 2 --max-restarts 1 tests/fault_injection.py \\
        --kill-at 3 --kill-rank 1 --first-attempt-only -- tests/toy_train.py OUT
    python tests/fault_injection.py --nan-from-step 1 --nan-cores all -- train.py ...

Steps are optimizer steps counted over the whole run (``Brain.optimizer_step``, which a
resume restores). ``--kill-point``: ``step`` kills right after step k (before its
checkpoint), ``save`` during the next checkpoint save (files written, not yet published),
``saved`` right after that checkpoint is published. Kills are SIGKILL: no handler, no
cleanup, like a pre-empted node.

As a library: :func:`corrupt_file`, :func:`write_wav`, :func:`kill_argv`, :func:`nan_argv`, and
:func:`run_python` / :class:`WarmPython` / :func:`quick_corpus` / :func:`recipe_argv` for the subprocess
tests.
"""
from __future__ import annotations

import argparse
import os
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LAUNCHER = str(HERE / "fault_injection.py")
TOY_TRAIN = str(HERE / "toy_train.py")
RECIPE = ROOT / "recipes" / "mini_tts" / "ASR" / "conformer"
HAVE_TTS = all(shutil.which(p) for p in ("espeak-ng", "flite", "sox"))


# -- the library ------------------------------------------------------------------------
def corrupt_file(path, how: str = "garbage") -> None:
    """``garbage``: replace the content by bytes no audio reader accepts; ``truncate``: keep the first 20 bytes."""
    path = Path(path)
    if how == "garbage":
        path.write_bytes(b"this is not audio\n" * 8)
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[:20])
    else:
        raise ValueError(f"unknown corruption {how!r}; accepted: garbage, truncate")


def write_wav(path, sample_rate: int, seconds: float = 1.0) -> None:
    """A quiet sine tone (for wrong-sample-rate tests)."""
    import numpy as np
    import soundfile

    t = np.arange(int(sample_rate * seconds)) / sample_rate
    soundfile.write(str(path), (0.1 * np.sin(2 * np.pi * 220 * t)).astype("float32"), sample_rate)


def kill_argv(step: int, point: str = "step", rank: int = 0, first_attempt_only: bool = False) -> list[str]:
    """Launcher options killing ``rank`` at ``step``."""
    argv = ["--kill-at", str(step), "--kill-point", point, "--kill-rank", str(rank)]
    return argv + (["--first-attempt-only"] if first_attempt_only else [])


def nan_argv(step: int, cores: str = "0", rank: int = 0, onwards: bool = False) -> list[str]:
    """Launcher options putting a NaN into the gradient of ``cores`` of ``rank`` at ``step`` (or from it on)."""
    return ["--nan-from-step" if onwards else "--nan-step", str(step), "--nan-cores", cores, "--nan-rank", str(rank)]


def python_env(extra: Optional[dict] = None) -> dict:
    """The environment of the tests' subprocesses: privasr importable, one thread, no debug mode."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(extra or {})}
    env.pop("PRIVASR_DEBUG", None)
    return env


def run_python(*args, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    """``python ARGS`` (``-m torch.distributed.run ...`` included) from the repository root, text output."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=python_env(kwargs.pop("env", {})),
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def start_python(*args, env: Optional[dict] = None) -> subprocess.Popen:
    """:func:`run_python` without waiting: the process, its text output in pipes (``communicate()`` it)."""
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=python_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class WarmPython:
    """Fresh processes without a fresh interpreter's start-up: a "zygote" interpreter (:func:`python_env`, the
    repository root as working directory) imports ``preload`` once (torch, SpeechBrain, privasr: 5-15 s a start on
    a loaded 2-core machine), then forks one child per :meth:`run`. A child runs its script as ``python ARGS``
    would (``runpy``, ``sys.argv``, the script's folder first on ``sys.path``) and exits with the script's status;
    a SIGKILLed child is a dead process like any other (status -9). What a child does never reaches the zygote
    or its other children: each starts from the zygote's state (modules imported, nothing trained).

    Children of one zygote share its hash seed (``PYTHONHASHSEED`` is drawn once per interpreter): a test
    comparing runs keeps its reference a plain :func:`start_python` process, so that the compared runs still
    come from independent interpreters.
    """

    def __init__(self, preload: Sequence[str] = ("torch", "torch._dynamo", "speechbrain", "privasr.brain")):
        code = "import sys, tests.fault_injection as f; f._zygote(sys.argv[1:])"
        self._proc = subprocess.Popen([sys.executable, "-c", code, *preload], cwd=ROOT, env=python_env(),
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def _ask(self, request: dict) -> dict:
        import json

        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        reply = self._proc.stdout.readline()
        if not reply:
            raise RuntimeError(f"WarmPython: the zygote interpreter died (status {self._proc.wait()})")
        return json.loads(reply)

    def run(self, *args, timeout: int = 300) -> subprocess.CompletedProcess:
        """:func:`run_python` for a script (``SCRIPT ARGS...``) in a forked child: its status and text output."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            argv = list(map(str, args))
            pid = self._ask({"argv": argv, "stdout": str(out), "stderr": str(err)})["pid"]
            status = self._ask({"wait": pid, "timeout": timeout})["status"]
            if status is None:
                raise subprocess.TimeoutExpired(argv, timeout)
            return subprocess.CompletedProcess([sys.executable, *argv], status, out.read_text(), err.read_text())

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()  # the zygote ends at the end of its input
            self._proc.wait(timeout=60)


def _zygote(preload: Sequence[str]) -> None:
    """WarmPython's interpreter: import ``preload``; then per request line (JSON), fork a child running ``argv``
    with its output in files (-> its pid), or wait for a child (-> its status, None after ``timeout`` s, the
    child killed)."""
    import importlib
    import json
    import time

    for module in preload:
        importlib.import_module(module)
    for line in sys.stdin:
        request = json.loads(line)
        if "wait" in request:
            deadline, status = time.monotonic() + request["timeout"], None
            while time.monotonic() < deadline:
                pid, raw = os.waitpid(request["wait"], os.WNOHANG)
                if pid:
                    status = os.waitstatus_to_exitcode(raw)
                    break
                time.sleep(0.05)
            if status is None:
                os.kill(request["wait"], signal.SIGKILL)
                os.waitpid(request["wait"], 0)
            reply = {"status": status}
        else:
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                _child(request["argv"], request["stdout"], request["stderr"])
            reply = {"pid": pid}
        print(json.dumps(reply), flush=True)
    os._exit(0)  # the end of the input: no interpreter teardown of torch (seconds), nothing left to flush


def _child(argv: list[str], stdout: str, stderr: str) -> None:
    """A forked child: ``python ARGV`` with stdout / stderr in files; never returns (os._exit with its status)."""
    import atexit
    import traceback

    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    stdin = os.open(os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    os.close(stdin)
    status = 0
    try:
        sys.argv = list(argv)
        sys.path[0] = str(Path(argv[0]).resolve().parent)  # as `python SCRIPT` sets it
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as stop:  # sys.exit(): the status, or a message and 1 (as the interpreter does)
        if stop.code is None or isinstance(stop.code, int):
            status = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            status = 1
    except BaseException:  # an uncaught exception: the traceback and 1
        traceback.print_exc()
        status = 1
    finally:
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    os._exit(status)


def quick_corpus(base: Path) -> Path:
    """``egs/mini_tts/run.sh --quick true`` stages 0-3 in ``base/quick`` (made once; a few seconds),
    plus ``train16.csv`` / ``dev4.csv``: the first 16 / 4 utterances of the training / dev manifests."""
    data = base / "quick" / "data"
    if not (data / ".subsets_done").exists():
        proc = subprocess.run(["bash", str(ROOT / "egs" / "mini_tts" / "run.sh"), "--quick", "true", "--stop_stage",
                               "3", "--data", str(data), "--exp", str(base / "quick" / "exp")],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        for name, source, n in (("train16.csv", "train_with_canaries.csv", 16), ("dev4.csv", "dev.csv", 4)):
            lines = (data / source).read_text().splitlines(keepends=True)
            (data / name).write_text("".join(lines[: n + 1]))
        (data / ".subsets_done").touch()
    return data


def recipe_argv(data: Path, out: Path, *overrides: str) -> list[str]:
    """The mini_tts recipe's train.py on the small subsets with the ``tiny`` model (a few seconds a step)."""
    return [str(RECIPE / "train.py"), str(RECIPE / "hparams" / "conformer_ctc.yaml"), "--data_folder", str(data),
            "--tokenizer_dir", str(data / "tokenizer"), "--train_csv", str(data / "train16.csv"),
            "--dev_csv", str(data / "dev4.csv"), "--output_folder", str(out), "--model_size", "tiny",
            "--mode", "train", "--noprogressbar", *overrides]


# -- the faults -------------------------------------------------------------------------
def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _die(reason: str) -> None:
    print(f"fault_injection: SIGKILL rank {_rank()} ({reason})", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


class Faults:
    """The faults of one process, installed by monkeypatching privasr's training step."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.current_step = 0  # the optimizer step being computed (1-based)
        self.armed_save = False
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.kill_enabled = args.kill_at is not None and _rank() == args.kill_rank and not (
            args.first_attempt_only and attempt != "0")

    def install(self) -> None:
        import privasr.brain as brain
        from privasr.resume import AtomicCheckpointer

        faults = self
        fit_batch, apply_step = brain.PrivateBrain.fit_batch, brain.PrivateBrain._apply_step
        publish = AtomicCheckpointer._publish

        def patched_fit_batch(self, batch):
            faults.current_step = self.optimizer_step + 1
            return fit_batch(self, batch)

        def patched_apply_step(self):
            apply_step(self)
            faults.after_step(self.optimizer_step)

        def patched_publish(staging, final):
            if faults.armed_save and faults.args.kill_point == "save":
                _die(f"during the checkpoint save after step {faults.args.kill_at}: {staging.name} not published")
            publish(staging, final)
            if faults.armed_save and faults.args.kill_point == "saved":
                _die(f"after the checkpoint of step {faults.args.kill_at} was published")

        brain.PrivateBrain.fit_batch = patched_fit_batch
        brain.PrivateBrain._apply_step = patched_apply_step
        AtomicCheckpointer._publish = staticmethod(patched_publish)
        if self.args.nan_step is not None or self.args.nan_from_step is not None:
            import privasr.private_step as private_step

            self._install_nan(private_step)

    def after_step(self, optimizer_step: int) -> None:
        if not self.kill_enabled or optimizer_step != self.args.kill_at:
            return
        if self.args.kill_point == "step":
            _die(f"after optimizer step {optimizer_step}")
        self.armed_save = True

    # -- NaN in a core's gradient ---------------------------------------------------------
    def nan_now(self) -> bool:
        a = self.args
        if _rank() != a.nan_rank:
            return False
        if a.nan_from_step is not None:
            return self.current_step >= a.nan_from_step
        return self.current_step == a.nan_step

    def poisoned(self, core: int) -> bool:
        return self.nan_now() and (self.args.nan_cores == "all" or core in
                                   {int(c) for c in self.args.nan_cores.split(",")})

    def _install_nan(self, step_module) -> None:
        """Wrap the per-core gradient functions where the step calls them: ``privasr.private_step``'s
        globals, read by :func:`privasr.private_step.accumulate_cores` (PrivateBrain and PerCoreClipping).
        A missing name is an error, not a silent no-op (the NaN tests would then test nothing)."""
        faults = self
        for name in ("shard_grads_loop", "shard_grads_vmap"):
            if name not in vars(step_module) or name not in step_module.accumulate_cores.__code__.co_names:
                raise RuntimeError(f"fault_injection: {step_module.__name__}.accumulate_cores no longer calls "
                                   f"{name}; patch the function that computes per-core gradients now")
        loop, vmap = step_module.shard_grads_loop, step_module.shard_grads_vmap

        def nan_loop(*args, **kwargs):
            for core, (grads, loss) in enumerate(loop(*args, **kwargs)):
                if faults.poisoned(core):
                    grads = [None if g is None else g.clone().fill_(float("nan")) for g in grads]
                    print(f"fault_injection: NaN gradient in core {core} of rank {_rank()} at step "
                          f"{faults.current_step}", file=sys.stderr, flush=True)
                yield grads, loss

        def nan_vmap(*args, **kwargs):
            grads, losses = vmap(*args, **kwargs)
            cores = [c for c in range(losses.shape[0]) if faults.poisoned(c)]
            if cores:
                grads = [None if g is None else g.clone() for g in grads]
                for g in grads:
                    if g is not None:
                        g[cores] = float("nan")
            return grads, losses

        step_module.shard_grads_loop, step_module.shard_grads_vmap = nan_loop, nan_vmap


# -- the launcher ------------------------------------------------------------------------
def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" not in argv:
        raise SystemExit("fault_injection.py: error: expected OPTIONS -- SCRIPT ARGS...")
    split = list(argv).index("--")
    parser = argparse.ArgumentParser(prog="fault_injection.py")
    parser.add_argument("--kill-at", type=int, help="optimizer step after which to SIGKILL")
    parser.add_argument("--kill-point", choices=("step", "save", "saved"), default="step")
    parser.add_argument("--kill-rank", type=int, default=0)
    parser.add_argument("--first-attempt-only", action="store_true",
                        help="kill only when TORCHELASTIC_RESTART_COUNT is 0 (torchrun's first attempt)")
    parser.add_argument("--nan-step", type=int, help="the optimizer step whose core gradients get a NaN")
    parser.add_argument("--nan-from-step", type=int, help="every step from this one on gets NaNs")
    parser.add_argument("--nan-cores", default="0", help="comma-separated local core indices, or 'all'")
    parser.add_argument("--nan-rank", type=int, default=0)
    args = parser.parse_args(argv[:split])
    script = list(argv[split + 1:])
    if not script:
        raise SystemExit("fault_injection.py: error: no script after --")
    return args, script


def main(argv: Optional[Iterable[str]] = None) -> None:
    args, script = parse(list(sys.argv[1:] if argv is None else argv))
    Faults(args).install()
    sys.argv = script
    sys.path.insert(0, str(Path(script[0]).resolve().parent))
    runpy.run_path(script[0], run_name="__main__")


if __name__ == "__main__":
    main()
