#!/usr/bin/env bash
# Session 6, GPU call B (about 6 minutes on an H100): where flash_v2's forward loses to a
# minimal kernel with the same inner loop (experiments/flash_v2_fwd_gap.py), then the
# flash_v2 GPU tests on the kernels as committed (autotuning off).
# Usage: OUT=<folder> bash experiments/scripts/gpu_session6_b.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=disabled PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u
timeout 300 python3 experiments/flash_v2_fwd_gap.py > $OUT/fwd_gap.txt 2>&1
echo "fwd_gap exit $?"; grep "^|" $OUT/fwd_gap.txt; grep error $OUT/fwd_gap.txt | head -5
FATRAIN_AUTOTUNE=0 timeout 200 python3 -m pytest -q tests/test_flash_v2.py -k gpu > $OUT/gpu_tests.log 2>&1
echo "tests exit $?"; tail -3 $OUT/gpu_tests.log
