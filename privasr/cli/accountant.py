"""privasr-accountant: ε from (q, σ, T, δ), or the σ that meets a target ε.

Examples::

    privasr-accountant --sample-rate 0.01 --noise-multiplier 1.1 --steps 1000 --delta 1e-5
    1.71177
    privasr-accountant --sample-rate 0.01 --target-epsilon 2 --steps 1000 --delta 1e-5
    1.02295

Prints one number on stdout (``--steps 0`` spends nothing: 0; ``--noise-multiplier 0``: inf).
Bad input: one line on stderr, exit status 2.
"""
from __future__ import annotations

import sys
from typing import List, Optional

from privasr.cli import CliParser, run_cli

PROG = "privasr-accountant"


def build_parser() -> CliParser:
    parser = CliParser(
        prog=PROG,
        description="Privacy accounting for DP-SGD with Poisson sampling (Opacus accountants). "
        "Prints epsilon, or with --target-epsilon the noise multiplier that meets it.",
    )
    parser.add_argument("--sample-rate", "-q", type=float, required=True, help="Poisson rate q in (0, 1]")
    parser.add_argument("--steps", "-T", type=int, required=True, help="number of DP-SGD steps T")
    parser.add_argument("--delta", type=float, required=True, help="target delta in (0, 1)")
    goal = parser.add_mutually_exclusive_group(required=True)
    goal.add_argument("--noise-multiplier", "-s", type=float, help="sigma: print the epsilon spent")
    goal.add_argument("--target-epsilon", type=float, help="epsilon: print the sigma that meets it")
    parser.add_argument("--accountant", choices=("rdp", "prv"), default="rdp", help="default: rdp")
    return parser


def _main(argv: Optional[List[str]]) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    from privasr.accounting import epsilon, noise_multiplier_for

    try:
        if args.target_epsilon is not None:
            value = noise_multiplier_for(
                args.target_epsilon, args.sample_rate, args.steps, args.delta, args.accountant
            )
        else:
            value = epsilon(args.sample_rate, args.noise_multiplier, args.steps, args.delta, args.accountant)
    except ValueError as err:
        parser.error(str(err).splitlines()[0])
    except (MemoryError, OverflowError):  # PRV discretizes the privacy loss; a tiny sigma needs an absurd grid
        parser.error(f"the {args.accountant} accountant cannot evaluate this setting (the privacy loss is too "
                     f"large to discretize); use --accountant rdp")
    print(f"{value:.6g}")


def main(argv: Optional[List[str]] = None) -> int:
    """Console-script entry point; returns the exit status (bad input: one line, 2)."""
    return run_cli(_main, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
