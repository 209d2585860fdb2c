#!/usr/bin/env bash
# Session 9, GPU call H (about 8 minutes on an H100): the GPU tests that autotune (every test file's
# GPU tests but the float64-reference matrix, run with FATRAIN_AUTOTUNE=0 before, and the pinned-config
# sweep), on the refining autotuner and the register-capped forward config; a flash_v2 training job's
# result.json with its autotune picks.
# Usage: OUT=<folder> bash experiments/scripts/gpu_session9_h.sh  (everything comes back in h.tar)
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=offline PYTHONUNBUFFERED=1
WORK=/tmp/fatrain_s9h; mkdir -p $WORK/res
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $WORK/res/env.txt 2>&1
cat $WORK/res/env.txt
timeout 560 python3 -m pytest -q -rs --durations=10 tests/ -k "gpu and not matches_reference and not every_autotune" \
  > $WORK/res/tests.log 2>&1
echo "tests exit $?"; grep -v "^  \|^$\|warn" $WORK/res/tests.log | tail -25; date -u
tar -C $WORK -cf $OUT/h.tar res
