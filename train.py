"""Train a domain DDPM (LightningCLI). See docs/training.md.

python train.py fit --config configs/tiny.yaml --data.path datasets/tiny.lmdb
python train.py export runs/tiny/checkpoints/last.ckpt
"""

import sys

from ilvr_toolkit.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
