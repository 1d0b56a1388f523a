#!/usr/bin/env python3
"""privasr-pretrained: keep a finished pre-training in the repository, check one, install one into a job.

The code is in :mod:`privasr.cli.pretrained`; this file only runs its ``main``.
"""
import sys

from privasr.cli.pretrained import main

if __name__ == "__main__":
    sys.exit(main())
