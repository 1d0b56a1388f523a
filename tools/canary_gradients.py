#!/usr/bin/env python3
"""privasr-canary-gradients: per-example gradient norms of canaries vs normal utterances on a trained model.

The code is in :mod:`privasr.cli.canary_gradients`; this file only runs its ``main``.
"""
import sys

from privasr.cli.canary_gradients import main

if __name__ == "__main__":
    sys.exit(main())
