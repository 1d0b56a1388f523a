"""privasr's command-line tools, and the one convention every tool's command line follows.

Each console script is a module here with ``main(argv=None) -> int`` (the exit status, also when
called in-process); ``tools/<module>.py`` is a thin executable over it, and
``python -m privasr.cli.<module>`` runs it too:

============================  =======================================================================
``privasr-bench``             :mod:`privasr.cli.bench_clipping` -- clipping strategies under real DDP
``privasr-bench-dp``          :mod:`privasr.cli.bench_dp` -- a DP-SGD step next to a non-private one
``privasr-bench-recipe``      :mod:`privasr.cli.bench_recipe` -- the recipe's step with/without speed-ups
``privasr-canaries``          :mod:`privasr.cli.make_canaries` -- Secret Sharer canaries and holdout
``privasr-exposure``          :mod:`privasr.cli.score_exposure` -- exposure of canaries; compare runs
``privasr-accountant``        :mod:`privasr.cli.accountant` -- epsilon, or the sigma meeting a target
``privasr-norm-quantiles``    :mod:`privasr.cli.norm_quantiles` -- per-core norms of a trained model
``privasr-canary-gradients``  :mod:`privasr.cli.canary_gradients` -- canary vs normal gradient norms
(no console script)           :mod:`privasr.cli.device_equivalence` -- CUDA/NCCL vs the CPU reference
============================  =======================================================================

The convention (this module):

* :class:`CliParser` -- an :class:`argparse.ArgumentParser` whose errors are *one* line
  ``<prog>: error: ... (see --help)`` and exit status 2; :meth:`CliParser.parse_with_overrides`
  for tools that load a recipe: the tool's options, then after ``--`` the recipe's overrides.
* :func:`run_cli` -- runs ``main(argv)`` and returns its exit status: bad input (a
  :class:`~privasr.faults.UserError`, ``ValueError``, ``OSError``, ``RuntimeError``) is one line
  ``<prog>: error: ...`` and status 2, never a traceback (``PRIVASR_DEBUG=1`` re-raises).
* argument types that refuse bad values while parsing, before any work: :func:`positive_int`,
  :func:`nonnegative_int`, :func:`positive_float`, :func:`fraction`, :func:`output_file`
  (and :func:`check_output_file` for outputs a tool derives from its arguments).

A recipe's ``train.py`` has its own runner, :func:`privasr.faults.run_cli` (process-group
shutdown, diverged runs exit 1); the two are to become one.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from privasr.faults import UserError

__all__ = ["CliParser", "run_cli", "USER_ERRORS", "positive_int", "nonnegative_int", "positive_float", "fraction",
           "output_file", "check_output_file"]

#: Exceptions that mean "the input is wrong", reported as one line with exit status 2.
USER_ERRORS = (UserError, ValueError, OSError, RuntimeError)


class CliParser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` whose errors are a single line and exit code 2."""

    def error(self, message: str) -> NoReturn:  # noqa: D102 (argparse API)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_with_overrides(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        """The tool's options before ``--``; the recipe overrides after it, as ``args.overrides`` (a list).

        For tools that load a recipe as ``train.py`` does (``TOOL HPARAMS.yaml [options] -- --key value``):
        a recipe key given before ``--`` is refused with the hint to move it after ``--``.
        """
        argv = list(sys.argv[1:] if argv is None else argv)
        split = argv.index("--") if "--" in argv else len(argv)
        args, unknown = self.parse_known_args(argv[:split])
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)} (recipe overrides go after --, "
                       f"e.g. -- --output_folder exp/baseline/seed1)")
        args.overrides = argv[split + 1:]
        return args


def run_cli(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None, prog: str) -> int:
    """Run ``main(argv)``; return its exit status, turning user errors into ``prog: error: ...`` and 2.

    ``main`` returning an integer makes it the status (e.g. 1: a check failed); ``None`` is 0.
    The parser's own exit (``--help``: 0, a bad option: 2, already reported by :class:`CliParser`)
    is returned rather than raised, so ``main(argv)`` called in-process always returns the status
    the command line would have. ``PRIVASR_DEBUG=1`` re-raises user errors, for a traceback.
    """
    try:
        status = main(argv)
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
    return status if isinstance(status, int) and not isinstance(status, bool) else 0


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


def _output_problem(path: Path) -> str | None:
    """Why ``path`` cannot be written as a file (None when it can); nothing is created."""
    if str(path) == "" or path.is_dir() or str(path).endswith(os.sep):
        return f"{str(path) or repr('')}: is a directory, expected a file name"
    if path.exists():
        return None if os.access(path, os.W_OK) else f"{path}: not writable"
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{path}: {ancestor} is a file, not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{path}: directory {ancestor} is not writable"
    return None


def check_output_file(path: str | os.PathLike, option: str) -> Path:
    """Refuse, before any work, an output file that cannot be written; return it as a :class:`Path`.

    ``path`` must not be a directory; it must be writable if it exists, else its nearest existing
    ancestor must be a writable directory (missing parents are created when the file is written).
    Nothing is created here. Raises :class:`ValueError` naming ``option``.
    """
    path = Path(path)
    problem = _output_problem(path)
    if problem:
        raise ValueError(f"{option} {problem}")
    return path


def output_file(text: str) -> str:
    """An output file name that can be written (:func:`check_output_file`'s rules), checked while parsing."""
    problem = _output_problem(Path(text))
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text
