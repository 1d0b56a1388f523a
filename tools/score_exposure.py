#!/usr/bin/env python3
"""privasr-exposure: exposure of canaries from a model's hypotheses, and comparison of runs.

The code is in :mod:`privasr.cli.score_exposure`; this file only runs its ``main``.
"""
import sys

from privasr.cli.score_exposure import main

if __name__ == "__main__":
    sys.exit(main())
