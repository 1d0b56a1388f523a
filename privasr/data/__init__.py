"""Corpora and manifests.

* :mod:`privasr.data.manifest` -- SpeechBrain CSV manifests (``ID,duration,wav,spk_id,wrd``).
* :mod:`privasr.data.text_source` -- the offline English sentence generator behind mini_tts.
* :mod:`privasr.data.mini_tts` -- a small corpus synthesized on the machine (espeak-ng, flite, sox).
* :mod:`privasr.data.librispeech` -- LibriSpeech directory tree to manifests.
* :mod:`privasr.data.librilight` -- Libri-Light audio tree to an audio-only manifest (pre-training).

This module also holds the two conventions every privasr command line shares:

* :class:`CliParser` / :func:`run_cli`: bad input ends in *one* line on stderr and exit
  status 2, never a traceback; the argument types :func:`positive_int`, :func:`nonnegative_int`,
  :func:`positive_float` and :func:`fraction` refuse out-of-range numbers while parsing, and
  :func:`check_output_file` refuses an output path that cannot be written *before* any work;
* :func:`is_done` / :func:`mark_done`: a step that completed with the same parameters is
  not run again (idempotent, resumable stages); :func:`claim_dir` empties a directory of
  generated files that were made with other settings, so resuming never mixes two runs.

The corpus modules are not imported here, so that ``python -m privasr.data.mini_tts`` runs
cleanly.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, NoReturn, Sequence

from privasr.faults import UserError

__all__ = ["CliParser", "run_cli", "is_done", "mark_done", "claim_dir", "audio_durations", "USER_ERRORS",
           "positive_int", "nonnegative_int", "positive_float", "fraction", "check_output_file"]

#: Exceptions that mean "the input is wrong", reported as one line with exit status 2.
USER_ERRORS = (UserError, ValueError, OSError, RuntimeError)


class CliParser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` whose errors are a single line and exit code 2."""

    def error(self, message: str) -> NoReturn:  # noqa: D102 (argparse API)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run_cli(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None, prog: str) -> int:
    """Run ``main(argv)``; return its exit status, turning user errors into ``prog: error: ...`` and 2.

    The parser's own exit (``--help``: 0, a bad option: 2, already reported by :class:`CliParser`)
    is returned rather than raised, so ``main(argv)`` called in-process always returns the status
    the command line would have. ``PRIVASR_DEBUG=1`` re-raises user errors, for a traceback.
    """
    try:
        main(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except USER_ERRORS as err:
        if os.environ.get("PRIVASR_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


# -- argument types: a number out of range is a parse error (one line), not a crash mid-run --
def _number(text: str, kind: type, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (a count of steps, processes, utterances ...)."""
    value = _number(text, int, "an integer >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (e.g. warm-up steps)."""
    value = _number(text, int, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (a duration, a factor)."""
    value = _number(text, float, "a finite number > 0")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {value:g}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1] (a quantile, a fraction); ``10`` gets the hint that ``0.1`` means p10."""
    value = _number(text, float, "a number in [0, 1]")
    if not 0.0 <= value <= 1.0:
        hint = f" (a fraction: {value / 100:g} for {value:g} %)" if 1.0 < value <= 100.0 else ""
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value:g}{hint}")
    return value


def check_output_file(path: str | os.PathLike, option: str) -> Path:
    """Refuse, before any work, an output file that cannot be written; return it as a :class:`Path`.

    ``path`` must not be a directory; it must be writable if it exists, else its nearest existing
    ancestor must be a writable directory (missing parents are created when the file is written).
    Nothing is created here. Raises :class:`ValueError` naming ``option``.
    """
    path = Path(path)
    if str(path) == "" or path.is_dir() or str(path).endswith(os.sep):
        raise ValueError(f"{option} {str(path) or repr('')}: is a directory, expected a file name")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise ValueError(f"{option} {path}: not writable")
        return path
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{option} {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: directory {ancestor} is not writable")
    return path


def is_done(marker: str | os.PathLike, params: Mapping[str, Any], outputs: Sequence[str | os.PathLike] = ()) -> bool:
    """True when ``marker`` records exactly ``params`` and every path in ``outputs`` exists."""
    marker = Path(marker)
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return recorded == _jsonable(params) and all(Path(p).exists() for p in outputs)


def mark_done(marker: str | os.PathLike, params: Mapping[str, Any]) -> None:
    """Record that the step producing ``marker`` finished with ``params`` (atomic write)."""
    marker = Path(marker)
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(params), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, marker)


def claim_dir(directory: str | os.PathLike, key: Mapping[str, Any]) -> Path:
    """Create ``directory`` for files generated under ``key``; return it.

    ``directory/.key.json`` records the key. If it records another key, the directory (which
    privasr created) is deleted first; files left by an interrupted run with the same key stay.
    """
    directory = Path(directory)
    key_file = directory / ".key.json"
    if key_file.is_file() and not is_done(key_file, key):
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    mark_done(key_file, key)
    return directory


def audio_durations(paths: Sequence[str | os.PathLike], nj: int, desc: str) -> list[float]:
    """Durations in seconds of the audio files ``paths`` (from their headers), ``nj`` at a time, with a progress bar."""
    from concurrent.futures import ThreadPoolExecutor

    import soundfile
    from tqdm import tqdm

    def duration(path) -> float:
        info = soundfile.info(str(path))
        return info.frames / info.samplerate

    with ThreadPoolExecutor(max_workers=nj) as pool:
        return list(tqdm(pool.map(duration, paths), total=len(paths), desc=desc, unit="file"))


def _jsonable(params: Mapping[str, Any]) -> Any:
    """Normalise ``params`` through JSON, so tuples and lists compare equal after a round trip."""
    return json.loads(json.dumps(params, sort_keys=True, default=str))
