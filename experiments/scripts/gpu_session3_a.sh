#!/usr/bin/env bash
# Session 3, GPU call A (about 8 minutes on an H100):
#   1. dropout cost in flash_v2 with the row x column product generator (issue 5): bf16, causal, d=128,
#      p = 0 / 0.1, N = 8192 and 16384, forward and forward+backward, autotuned and pinned (first configs)
#   2. every GPU-marked test, 12 pytest-xdist workers, autotuning off (one config per kernel)
# Usage: OUT=<folder> bash experiments/scripts/gpu_session3_a.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=disabled PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
B="python3 -m fatrain.bench bench=features impls=[flash_v2] windows=[-1] doc_lens=[0] dropout_ps=[0.0,0.1] plot=false"
timeout 200 $B seqlens=[8192,16384] out_dir=$OUT name=dropout_autotuned > $OUT/dropout_autotuned.log 2>&1
echo "autotuned exit $?"; cut -d, -f1-5,9,10,15 $OUT/dropout_autotuned.csv
FATRAIN_AUTOTUNE=0 timeout 90 $B seqlens=[16384] out_dir=$OUT name=dropout_pinned > $OUT/dropout_pinned.log 2>&1
echo "pinned exit $?"; cut -d, -f1-5,9,10,15 $OUT/dropout_pinned.csv
FATRAIN_AUTOTUNE=0 timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider -n 12 -rfE tests/ \
  > $OUT/gpu_tests.log 2>&1
echo "tests exit $?"; grep -E "passed|failed|FAILED|ERROR" $OUT/gpu_tests.log | tail -25
