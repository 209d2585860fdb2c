#!/usr/bin/env bash
# Session 4, GPU call B (about 9 minutes on an H100): flash_v1 with the num_splits heuristic (issue 4)
#   1. the GPU tests of flash_v1 again (heuristic changed after call A)
#   2. fatrain-bench: naive, flash_v1 (default splits), flash_v1_bh (paper grid), flash_v2; 1k-16k (+32k)
# Usage: OUT=<folder> bash experiments/scripts/gpu_session4_b.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=disabled PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
FATRAIN_AUTOTUNE=0 timeout 130 python3 -m pytest -q -m gpu -p no:cacheprovider -n 12 -rfE \
  tests/test_flash_v1.py > $OUT/gpu_tests.log 2>&1
echo "tests exit $?"; grep -E "passed|failed|FAILED|ERROR" $OUT/gpu_tests.log | tail -15
B="python3 -m fatrain.bench out_dir=$OUT name=flash_v1_bench_h100"
timeout 330 $B impls=[naive,flash_v1,flash_v1_bh,flash_v2] seqlens=[1024,2048,4096,8192,16384] plot=false \
  > $OUT/bench.log 2>&1
echo "bench exit $?"
timeout 60 $B impls=[flash_v1,flash_v2] seqlens=[32768] append=true plot=true > $OUT/bench32k.log 2>&1
echo "bench 32k exit $?"
cut -d, -f1-7,9-12,16 $OUT/flash_v1_bench_h100.csv
