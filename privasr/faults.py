"""Kept only for old imports: ``from privasr.faults import ...`` and ``python -m privasr.faults check-overrides``.

Its contents moved to modules named for what they hold; import from those:

* :class:`~privasr.errors.UserError`, :class:`~privasr.errors.NonFiniteGradientsError` -- :mod:`privasr.errors`;
* :func:`~privasr.cli.run_cli` and :func:`~privasr.cli.one_line` -- :mod:`privasr.cli` (one runner for the
  tools and the recipes; a recipe passes ``user_errors=RECIPE_ERRORS, interrupted_hint=RESUME_HINT``);
* :func:`~privasr.cli.hparams.parse_arguments`, :func:`~privasr.cli.hparams.load_hparams`,
  :func:`~privasr.cli.hparams.check_overrides`, ``resolved_values``, ``yaml_defaults``, ``recipe_help`` and the
  ``check-overrides`` command -- :mod:`privasr.cli.hparams`.

:func:`run_cli` here keeps the recipes' old behaviour (only a :class:`UserError` is one line and status 2,
warnings to stdout until the recipe sets up logging) for callers not yet moved.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, Optional, Sequence

from privasr.cli import one_line
from privasr.cli import run_cli as _run_cli
from privasr.cli.hparams import (RECIPE_ERRORS, RESUME_HINT, check_overrides, check_overrides_main, load_hparams,
                                 parse_arguments, recipe_help, resolved_values, warnings_to_stdout, yaml_defaults)
from privasr.errors import NonFiniteGradientsError, UserError

__all__ = ["UserError", "NonFiniteGradientsError", "parse_arguments", "check_overrides", "load_hparams",
           "one_line", "run_cli", "resolved_values", "yaml_defaults", "recipe_help"]


def run_cli(main: Callable[[list], Any], argv: Sequence[str], prog: Optional[str] = None) -> int:
    """:func:`privasr.cli.run_cli` as a recipe's ``train.py`` calls it (old name; use that one)."""
    warnings_to_stdout()
    return _run_cli(main, argv, prog or os.path.basename(sys.argv[0]) or "train.py", user_errors=RECIPE_ERRORS,
                    interrupted_hint=RESUME_HINT)


if __name__ == "__main__":
    sys.exit(check_overrides_main(sys.argv[1:], prog="python -m privasr.faults"))
