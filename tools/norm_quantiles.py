#!/usr/bin/env python3
"""privasr-norm-quantiles: per-core gradient norms of a trained model at several per-core batch sizes.

The code is in :mod:`privasr.cli.norm_quantiles`; this file only runs its ``main``.
"""
import sys

from privasr.cli.norm_quantiles import main

if __name__ == "__main__":
    sys.exit(main())
