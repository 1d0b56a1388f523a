#!/usr/bin/env python3
"""privasr-bench for DP-SGD: the cost of a DP step next to a non-private one, under real DDP.

The code is in :mod:`privasr.cli.bench_dp`; this file only runs its ``main``.
"""
import sys

from privasr.cli.bench_dp import main

if __name__ == "__main__":
    sys.exit(main())
