#!/usr/bin/env bash
# Download, here (with the package registry), the wheels that bench/gpu_check.sh needs on a
# GPU machine whose image lacks them (the lent H200 image: Python 3.12, no lmdb,
# jsonargparse or torch-fidelity). They land in .whl/ (git-ignored: add "/.whl/" to
# .git/info/exclude); carry ".whl" to the machine, where gpu_check.sh installs them into
# /tmp/ilvr_site. Pinned to what CI installs; no dependencies beyond the ones named here.
#
#   bash bench/fetch_gpu_wheels.sh [PYTHON_VERSION]      # default 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
exclude=$(git rev-parse --git-path info/exclude 2>/dev/null || true)
if [ -n "$exclude" ]; then
  mkdir -p "$(dirname "$exclude")"
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
fi
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl lmdb==3.0.0 jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 \
  torch-fidelity==0.4.0
ls -l .whl
du -sh .whl
