"""Shared fixtures of the data / canary / exposure tests (a tiny synthesized corpus)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Under pytest-xdist (the README's `-n 2`: one worker per core of a 2-core machine) torch in a worker, and every
# process its tests start, use one thread: two workers of 2 threads each would fight over both cores. (Set before
# any test module imports torch, which reads it once.)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
HAVE_TTS = all(shutil.which(p) for p in ("espeak-ng", "flite", "sox"))
requires_tts = pytest.mark.skipif(not HAVE_TTS, reason="needs espeak-ng, flite and sox (apt-get install them)")

#: Sizes of the tiny mini_tts corpus shared by the tests.
TINY_SIZES = {"num_train": 16, "num_dev": 3, "num_test": 3}


@pytest.fixture(scope="session")
def tiny_mini_tts(tmp_path_factory) -> dict[str, Path]:
    """Paths of a 22-utterance mini_tts corpus (seed 0), synthesized once per session."""
    if not HAVE_TTS:
        pytest.skip("needs espeak-ng, flite and sox")
    from privasr.data.mini_tts import prepare_mini_tts

    return prepare_mini_tts(tmp_path_factory.mktemp("tiny_mini_tts"), nj=2, seed=0, **TINY_SIZES)


@pytest.fixture(scope="session")
def warm_python():
    """A :class:`tests.fault_injection.WarmPython` for the session: fresh training processes (toy_train.py, the
    mini_tts recipe, under the fault launcher) without paying torch's and SpeechBrain's import each time."""
    from .fault_injection import WarmPython

    warm = WarmPython(("torch", "torch._dynamo", "speechbrain", "privasr.brain", "privasr.asr", "privasr.cli.hparams",
                       "privasr.provenance"))
    yield warm
    warm.close()


def run_privasr_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` from the repository root; capture text output."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit status 2, no traceback, a single stderr line containing every fragment."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
