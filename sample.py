#!/usr/bin/env python
"""Translate images with ILVR. ``python sample.py`` runs the bundled demo;
``python sample.py --help`` lists every option; see README.md."""

import sys

from ilvr_toolkit.evaluation.runs import evaluate_run
from ilvr_toolkit.sampling.cli import main

if __name__ == "__main__":
    sys.exit(main(evaluate=evaluate_run))
