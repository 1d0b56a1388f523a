#!/usr/bin/env python3
"""privasr-bench-recipe: the real recipe training step, per method, with and without each speed-up.

The code is in :mod:`privasr.cli.bench_recipe`; this file only runs its ``main``.
"""
import sys

from privasr.cli.bench_recipe import main

if __name__ == "__main__":
    sys.exit(main())
