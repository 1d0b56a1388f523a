#!/usr/bin/env python3
"""privasr-canaries: make Secret Sharer canaries, a holdout set, and insert the canaries.

The code is in :mod:`privasr.cli.make_canaries`; this file only runs its ``main``.
"""
import sys

from privasr.cli.make_canaries import main

if __name__ == "__main__":
    sys.exit(main())
