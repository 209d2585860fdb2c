#!/usr/bin/env bash
# Session 9, GPU call F (about 5 minutes on an H100): how stable the backward passes' autotuned picks
# are at the training shapes (3 fresh autotuners each, every config pinned in 2 interleaved rounds):
# call E's whole-backward times with both passes autotuned moved from 370 to 394 TFLOP/s at 16k
# between processes.
# Usage: OUT=<folder> bash experiments/scripts/gpu_session9_f.sh  (everything comes back in f.tar)
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
WORK=/tmp/fatrain_s9f; mkdir -p $WORK/res
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $WORK/res/env.txt 2>&1
cat $WORK/res/env.txt
for p in dkdv dq; do
  timeout 250 python3 experiments/flash_v2_autotune_picks.py --pass $p --rounds 2 > $WORK/res/picks_$p.log 2>&1
  echo "picks $p exit $?"; cut -c1-330 $WORK/res/picks_$p.log; date -u
done
tar -C $WORK -cf $OUT/f.tar res
