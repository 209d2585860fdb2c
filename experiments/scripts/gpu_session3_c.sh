#!/usr/bin/env bash
# Session 3, GPU call C (about 8 minutes on an H100):
#   1. dropout cost in flash_v2 after the inline-PTX select and the dK/dV redraw (issue 5), as call A
#   2. flash_v2 vs SDPA flash at d=128 with three more dK/dV and two more dQ autotune configs (issue 3)
#   3. the GPU tests of flash_v2 and the features (dropout through the inline PTX)
# Usage: OUT=<folder> bash experiments/scripts/gpu_session3_c.sh
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
timeout 230 python3 -m fatrain.bench bench=targets impls=[flash_v2,sdpa_flash] headdims=[128] out_dir=$OUT \
  name=targets_d128 plot=false > $OUT/targets_d128.log 2>&1
echo "targets exit $?"; python3 -c "from fatrain.bench import summarize; summarize('$OUT/targets_d128.csv')" 2>&1 | tail -25
FATRAIN_AUTOTUNE=0 timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -n 12 -rfE \
  tests/test_features.py tests/test_flash_v2.py > $OUT/gpu_tests.log 2>&1
echo "tests exit $?"; grep -E "passed|failed|FAILED|ERROR" $OUT/gpu_tests.log | tail -15
