#!/usr/bin/env bash
# GPU correctness checks and benchmarks for ilvr_toolkit, on one CUDA GPU, offline, < 8 min.
#
#   bash bench/gpu_check.sh                  # from the repository root (or anywhere)
#   BUDGET=300 bash bench/gpu_check.sh       # total seconds for the steps (default 450)
#
# Needs torch with CUDA (2.4+), pytorch_lightning, numpy, PIL. Nothing is installed or
# downloaded: the repository goes on PYTHONPATH. Packages the machine lacks (lmdb,
# jsonargparse and torch-fidelity are not in the lent H200 image) can travel as wheels in
# .whl/ (git-ignored): `bash bench/fetch_gpu_wheels.sh` downloads them here; carry ".whl";
# they are installed into /tmp/ilvr_site. Steps that need a missing package report SKIP,
# never a crash of the whole script.
#
# Steps, most important first; each has its own timeout, clipped to what is left of BUDGET,
# and a step that no longer fits is skipped:
#   env        versions, missing packages, copy / matmul ceilings of this card
#   fixture    ILVR fixture replay (official mode) in fp32, fp32+TF32, bf16, fp16 (+ native GroupNorm) vs the fixture
#   sync       no host-device syncs in DDPM/DDIM ILVR loops and the ffhq forward; CUDA graph
#   sampling   bench_sampling.py: ffhq 256 bf16 DDPM 100 at batch 16/32/64 (goal >= 10 img/s), DDIM 25; peak memory
#   unet       bench_unet.py: ffhq forward, batch 1..64, fp32/bf16, channels_last on/off
#   train      bench_train.py, ffhq batch 8/16/32, channels_last off/on (goal >= 300 img/s), peak memory
#   compile    torch.compile vs eager: tiny32 fp32 and ffhq bf16 (error bound + speed)
#   ddp        Lightning DDP on 1 GPU with the training module (bf16-mixed)
#   proposal   bench/proposals.py: GroupNorm proposals (epilogue fold, native bf16 GN), bf16 batch 32
#   ddp-cli    train.py fit --trainer.strategy ddp on a made-up LMDB, FID monitor, resumed fit (needs lmdb, jsonargparse, torch-fidelity)
#   fid        bench_fid.py (if present)
#   data       bench_data.py (if present; needs lmdb)
# Output: one log ($OUT/gpu_check.log), one JSON ($OUT/gpu_check_summary.json), and the
# summary table printed last. OUT defaults to bench/results/gpu_check.
set -u
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
OUT=${OUT:-$REPO/bench/results/gpu_check}
WORK=${WORK:-/tmp/ilvr_gpu_check}
BUDGET=${BUDGET:-450}
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
mkdir -p "$OUT" "$WORK"
rm -rf "$WORK/results" "$WORK/checks.jsonl"
mkdir -p "$WORK/results"
LOG="$OUT/gpu_check.log"
: > "$LOG"
export CHECKS="$WORK/checks.jsonl"
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"
START=$(date +%s)

if ls .whl/*.whl >/dev/null 2>&1; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/ilvr_site .whl/*.whl >>"$LOG" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:/tmp/ilvr_site"
    echo "installed $(ls .whl/*.whl | wc -l) carried wheels into /tmp/ilvr_site" | tee -a "$LOG"
  else
    echo "could not install the carried wheels (see log); continuing without them" | tee -a "$LOG"
  fi
fi

# step NAME LIMIT_S CMD...: run with a timeout clipped to the remaining budget; log everything.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 20 ]; then
    echo "{\"name\": \"$name\", \"status\": \"SKIP\", \"detail\": \"no time left in the ${BUDGET}s budget\"}" >>"$CHECKS"
    echo "== $name: skipped (budget)" | tee -a "$LOG"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s, $(($(date +%s) - START))s elapsed)" | tee -a "$LOG"
  local t0
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "== $name: rc $rc in $(($(date +%s) - t0))s" | tee -a "$LOG"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "{\"name\": \"$name\", \"status\": \"FAIL\", \"detail\": \"timed out after ${limit}s\"}" >>"$CHECKS"
  fi
}

# GPU_CHECKS_DEVICE=cpu dry-runs this script's plumbing on a CPU (steps time out or skip).
DEV=${GPU_CHECKS_DEVICE:-cuda}
if [ "$DEV" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >>"$LOG" 2>&1; then
  echo "torch sees no CUDA device: nothing to check here" | tee -a "$LOG"
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >>"$LOG" 2>&1

G="$PY bench/gpu_checks.py"
step env 60 $G env
step fixture 60 $G fixture
step sync 90 $G sync
step sampling 170 "$PY" bench/bench_sampling.py --device "$DEV" --precision bf16 --channels-last on \
  --cases ffhq:100:16 ffhq:100:32 ffhq:100:64 ffhq:ddim25:32 --repeats 2 --out-dir "$WORK/results" --tag _gpu
step unet 100 "$PY" bench/bench_unet.py --device "$DEV" --batch-sizes 1 16 32 64 --precisions bf16 fp32 \
  --channels-last both --compile off --repeats 5 --out-dir "$WORK/results" --tag _gpu
step train 150 $G other bench_train.py --timeout 145 -- --device "$DEV" --configs ffhq tiny \
  --batch-sizes ffhq=8,16,32 tiny=256 --precision bf16-mixed --channels-last both --steps 15 --out-dir "$WORK/results" --tag _gpu
step compile 180 $G compile --batch 32
step ddp 90 $G ddp-lightning --work "$WORK/ddp" --steps 40 --batch 64
step proposal 60 "$PY" bench/proposals.py --device "$DEV" --batch 32 --precision bf16 --repeats 10 \
  --out-dir "$WORK/results" --tag _gpu
step ddp-cli 150 $G ddp-train --work "$WORK/ddp_cli" --steps 30 --timeout 70
step fid 60 $G other bench_fid.py --timeout 55 -- --device "$DEV" --n-images 512 --batch-size 128 \
  --out-dir "$WORK/results" --tag _gpu
step data 60 $G other bench_data.py --timeout 55 -- --device "$DEV" --n-images 256 --workers 4 --batch-size 32 \
  --repeats 2 --workdir "$WORK/data" --out-dir "$WORK/results" --tag _gpu

echo "total $(($(date +%s) - START))s" | tee -a "$LOG"
$G summary --results "$WORK/results" --out "$OUT" 2>>"$LOG" | tee -a "$LOG"
