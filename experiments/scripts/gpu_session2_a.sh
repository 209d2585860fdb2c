#!/usr/bin/env bash
# Session 2, GPU call A (about 8 minutes on an H100):
#   1. every GPU-marked test, 12 pytest-xdist workers (autotuning off: one config per kernel)
#   2. flash_v1's pipelining depth (NUM_STAGES 1/2/3) against naive (experiments/flash_v1_timing.py)
#   3. dropout cost in flash_v2 at 16 and 8 random bits per element (fatrain-bench, features preset)
# Usage: OUT=<folder> bash experiments/scripts/gpu_session2_a.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=disabled PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
FATRAIN_AUTOTUNE=0 timeout 250 python3 -m pytest -q -m gpu -p no:cacheprovider -n 12 -rfE tests/ \
  > $OUT/gpu_tests.log 2>&1
echo "tests exit $?"; grep -E "passed|failed|FAILED|ERROR" $OUT/gpu_tests.log | tail -25
timeout 140 python3 experiments/flash_v1_timing.py --naive > $OUT/flash_v1_timing.log 2>&1
echo "v1 exit $?"; grep "^|" $OUT/flash_v1_timing.log
for bits in 16 8; do
  FATRAIN_DROPOUT_BITS=$bits timeout 90 python3 -m fatrain.bench bench=features impls=[flash_v2] windows=[-1] \
    doc_lens=[0] dropout_ps=[0.0,0.1] seqlens=[16384] out_dir=$OUT name=dropout_bits$bits plot=false \
    > $OUT/dropout_bits$bits.log 2>&1
  echo "bits $bits exit $?"; cut -d, -f1-5,9,10,15 $OUT/dropout_bits$bits.csv
done
