#!/usr/bin/env python3
"""On a GPU machine: per-core clipping on CUDA (NCCL across processes) equals the float64 CPU reference.

The code is in :mod:`privasr.cli.device_equivalence`; this file only runs its ``main``.
"""
import sys

from privasr.cli.device_equivalence import main

if __name__ == "__main__":
    sys.exit(main())
