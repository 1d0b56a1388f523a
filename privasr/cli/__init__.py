"""privasr's command-line tools, and the one convention every command follows (tools and recipes).

Each console script is a module here with ``main(argv=None) -> int`` (the exit status, also when
called in-process); ``tools/<module>.py`` is a thin executable over it, and
``python -m privasr.cli.<module>`` runs it too:

============================  =======================================================================
``privasr-bench``             :mod:`privasr.cli.bench_clipping` -- clipping strategies under real DDP
``privasr-bench-dp``          :mod:`privasr.cli.bench_dp` -- a DP-SGD step next to a non-private one
``privasr-bench-recipe``      :mod:`privasr.cli.bench_recipe` -- the recipe's step with/without speed-ups
``privasr-bench-ghost``       :mod:`privasr.cli.bench_ghost` -- PEC step cost: none / vmap / loop / ghost
``privasr-canaries``          :mod:`privasr.cli.make_canaries` -- Secret Sharer canaries and holdout
``privasr-exposure``          :mod:`privasr.cli.score_exposure` -- exposure of canaries; compare runs
``privasr-accountant``        :mod:`privasr.cli.accountant` -- epsilon, or the sigma meeting a target
``privasr-norm-quantiles``    :mod:`privasr.cli.norm_quantiles` -- per-core norms of a trained model
``privasr-canary-gradients``  :mod:`privasr.cli.canary_gradients` -- canary vs normal gradient norms
``privasr-pretrained``        :mod:`privasr.cli.pretrained` -- keep / verify / install a pre-training
(no console script)           :mod:`privasr.cli.device_equivalence` -- CUDA/NCCL vs the CPU reference
============================  =======================================================================

The convention (this module), for the tools and for the recipes' ``train.py`` alike:

* :class:`CliParser` -- an :class:`argparse.ArgumentParser` whose errors are *one* line
  ``<prog>: error: ... (see --help)`` and exit status 2; :meth:`CliParser.parse_with_overrides`
  for tools that load a recipe: the tool's options, then after ``--`` the recipe's overrides.
* :func:`run_cli` -- runs ``main(argv)`` and returns its exit status: bad input (by default a
  :class:`~privasr.errors.UserError`, ``ValueError``, ``OSError``, ``RuntimeError``) is one line
  ``<prog>: error: ...`` and status 2, never a traceback; a diverged run
  (:class:`~privasr.errors.NonFiniteGradientsError`) one line and status 1; Ctrl-C status 130
  (``PRIVASR_DEBUG=1`` re-raises, for a traceback). A multi-process run's group is shut down
  in order on every path. A recipe passes ``user_errors=(UserError,)`` so that a programming
  error keeps its traceback (:mod:`privasr.cli.hparams` reads its YAML and overrides).
* argument types that refuse bad values while parsing, before any work: :func:`positive_int`,
  :func:`nonnegative_int`, :func:`positive_float`, :func:`fraction`, :func:`output_file`
  (and :func:`check_output_file` for outputs a tool derives from its arguments).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from privasr.errors import NonFiniteGradientsError, UserError

__all__ = ["CliParser", "run_cli", "one_line", "USER_ERRORS", "positive_int", "nonnegative_int", "positive_float",
           "fraction", "output_file", "check_output_file"]

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


def run_cli(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None,
            prog: str | None = None, *, user_errors: tuple[type[BaseException], ...] = USER_ERRORS,
            interrupted_hint: str = "") -> int:
    """Run ``main(argv)``; return its exit status, each failure reported as one line ``prog: error: ...``.

    * ``main`` returns an integer: that status (e.g. 1: a check failed); anything else (``None``): 0;
    * ``SystemExit`` (``--help``: 0; a bad option, already reported by :class:`CliParser`: 2): its code,
      returned rather than raised, so ``main(argv)`` called in-process returns the command's status;
    * :class:`NonFiniteGradientsError`: 1, the run diverged (checked before ``user_errors``, of which
      its base ``RuntimeError`` is one by default);
    * one of ``user_errors``: 2, the input is wrong;
    * ``KeyboardInterrupt``: 130, ``prog: interrupted; <interrupted_hint>``;
    * anything else propagates: a bug, with its traceback.

    The message is :func:`one_line` of the error, with `` (rank N)`` on ranks other than 0 of a
    torchrun job. ``PRIVASR_DEBUG=1`` re-raises the two errors instead, for a traceback.

    A multi-process run (torchrun) ends here in order on every path, errors included:
    :func:`privasr.distributed.ordered_shutdown` meets the other ranks at a barrier when ``main``
    returned (rank 0 may still be decoding), skips it when ``main`` raised, and destroys the
    process group before the interpreter exits. It is imported only when ``torch.distributed``
    was (a group cannot exist otherwise), so a command without torch does not pay for importing it.
    """
    prog = prog or os.path.basename(sys.argv[0]) or "privasr"
    try:
        status = _in_order(main, None if argv is None else list(argv))
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except NonFiniteGradientsError as err:
        if os.environ.get("PRIVASR_DEBUG"):
            raise
        _report(prog, err)
        return 1
    except user_errors as err:
        if os.environ.get("PRIVASR_DEBUG"):
            raise
        _report(prog, err)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted" + (f"; {interrupted_hint}" if interrupted_hint else ""), file=sys.stderr,
              flush=True)
        return 130
    return status if isinstance(status, int) and not isinstance(status, bool) else 0


def _in_order(main: Callable[[Sequence[str] | None], Any], argv: list[str] | None) -> Any:
    """``main(argv)``, then :func:`privasr.distributed.ordered_shutdown`'s ending when torch.distributed is loaded."""
    try:
        result = main(argv)
    except BaseException:
        if "torch.distributed" not in sys.modules:
            raise
        from privasr.distributed import ordered_shutdown

        with ordered_shutdown():  # it tells a failure from the exception in flight (SystemExit(0): success)
            raise
    if "torch.distributed" in sys.modules:
        from privasr.distributed import shutdown_process_group

        shutdown_process_group()
    return result


def one_line(err: BaseException) -> str:
    """An exception as one line, unwrapping errors re-raised from DataLoader worker processes.

    A ``KeyError``'s message without its quotes; a message of one or two lines joined, of more
    lines its first (the rest is context: a YAML excerpt, a list of keys).
    """
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if "Original Traceback" in str(text):  # "Caught X in DataLoader worker ...": keep the original message
        last = lines[-1]
        prefix, _, message = last.partition(": ")
        return message if message and " " not in prefix else last
    return " ".join(lines) if len(lines) <= 2 else lines[0]


def _report(prog: str, err: BaseException) -> None:
    rank = os.environ.get("RANK")
    suffix = f" (rank {rank})" if rank not in (None, "0") else ""
    print(f"{prog}: error: {one_line(err)}{suffix}", file=sys.stderr, flush=True)


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
