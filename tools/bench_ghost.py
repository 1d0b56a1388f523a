#!/usr/bin/env python3
"""privasr-bench-ghost: per-example clipping's step cost by how per-example gradients are had.

The code is in :mod:`privasr.cli.bench_ghost`; this file only runs its ``main``.
"""
import sys

from privasr.cli.bench_ghost import main

if __name__ == "__main__":
    sys.exit(main())
