#!/usr/bin/env bash
# Session 8, GPU call E (about 6 minutes on an H100): issue 7's max_context on the session-8 code,
# every backend at batch 1 (grow by doubling from 1024, bisect to 1024 tokens), fixed kernel configs.
# Usage: OUT=<folder> bash experiments/scripts/gpu_session8_e.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=disabled PYTHONUNBUFFERED=1 FATRAIN_AUTOTUNE=0
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
for b in naive sdpa_flash sdpa_cudnn flash_v2 flash_v1; do
  timeout 110 python3 -m fatrain.max_context --backends $b --out $OUT/maxctx_$b > $OUT/maxctx_$b.log 2>&1
  echo "max_context $b exit $?"; tail -3 $OUT/maxctx_$b.log; date -u
done
