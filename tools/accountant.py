#!/usr/bin/env python3
"""privasr-accountant: ε from (q, σ, T, δ), or the σ that meets a target ε.

The code is in :mod:`privasr.cli.accountant`; this file only runs its ``main``.
"""
import sys

from privasr.cli.accountant import main

if __name__ == "__main__":
    sys.exit(main())
