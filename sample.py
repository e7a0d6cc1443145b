#!/usr/bin/env python
"""Translate images with ILVR. ``python sample.py`` runs the bundled demo;
``python sample.py --help`` lists every option; see README.md."""

import sys

try:
    from ilvr_toolkit.evaluation.runs import check_evaluation, evaluate_run
    from ilvr_toolkit.sampling.cli import main
except KeyboardInterrupt:  # Ctrl-C while torch imports: no traceback
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main(evaluate=evaluate_run, check=check_evaluation))
