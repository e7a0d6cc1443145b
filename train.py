"""Train a domain DDPM (LightningCLI). See docs/training.md.

python train.py fit --config configs/tiny.yaml --data.path datasets/tiny.lmdb
python train.py export runs/tiny/checkpoints/last.ckpt
"""

import sys

try:
    from ilvr_toolkit.training.cli import main
except KeyboardInterrupt:  # Ctrl-C while torch imports: no traceback
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
