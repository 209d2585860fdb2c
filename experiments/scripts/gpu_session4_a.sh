#!/usr/bin/env bash
# Session 4, GPU call A (about 8 minutes on an H100): flash_v1's num_splits (issue 4)
#   1. the GPU tests of flash_v1 (splits on by default there: small batch x heads) and the features
#   2. num_splits 1 (paper grid), 0 (heuristic), 2, 4, 8, 16 at d 64/128, N 2k/8k/16k, causal both
# Usage: OUT=<folder> bash experiments/scripts/gpu_session4_a.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=disabled PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
FATRAIN_AUTOTUNE=0 timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider -n 12 -rfE \
  tests/test_flash_v1.py tests/test_features.py > $OUT/gpu_tests.log 2>&1
echo "tests exit $?"; grep -E "passed|failed|FAILED|ERROR" $OUT/gpu_tests.log | tail -15
timeout 300 python3 experiments/flash_v1_timing.py --stages 1 --splits 1 0 2 4 8 16 --seqlens 2048 8192 16384 \
  --headdims 128 64 --modes fwd bwd fwdbwd --naive > $OUT/splits.log 2>&1
echo "splits exit $?"; grep "^|" $OUT/splits.log
