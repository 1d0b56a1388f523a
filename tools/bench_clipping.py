#!/usr/bin/env python3
"""privasr-bench: the cost of each clipping strategy under real DDP, side by side.

The code is in :mod:`privasr.cli.bench_clipping`; this file only runs its ``main``.
"""
import sys

from privasr.cli.bench_clipping import main

if __name__ == "__main__":
    sys.exit(main())
