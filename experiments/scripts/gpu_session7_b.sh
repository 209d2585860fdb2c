#!/usr/bin/env bash
# Session 7, GPU call B (about 7 minutes on an H100): the dK/dV pass reading LSE in base 2
# (written by the pass before it, _LSE2) against natural LSE times log2(e) per step, A/B in
# alternating rounds at d=64 causal 8k and 16k (with the autotuner's picks printed), then the
# flash_v2 GPU tests in three processes at once (autotuning off; the third pins every
# autotune configuration of each pass in turn).
# Usage: OUT=<folder> bash experiments/scripts/gpu_session7_b.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=disabled PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u
TRITON_PRINT_AUTOTUNING=1 timeout 200 python3 experiments/flash_v2_bwd_ab.py --switch _LSE2 --seqlens 8192 16384 \
  --headdims 64 --causal 1 --skip-host > $OUT/ab_lse2.txt 2>&1
echo "ab exit $?"; grep '"test": "_LSE2"' $OUT/ab_lse2.txt; grep -i "error" $OUT/ab_lse2.txt | head -5
grep -i "best config" $OUT/ab_lse2.txt | sort | uniq -c | head -20
FATRAIN_AUTOTUNE=0 timeout 300 python3 -m pytest -q tests/test_flash_v2.py -k "gpu and matches_reference" > $OUT/gpu_tests_a.log 2>&1 &
FATRAIN_AUTOTUNE=0 timeout 300 python3 -m pytest -q tests/test_flash_v2.py -k "gpu and not matches_reference and not every_autotune" > $OUT/gpu_tests_b.log 2>&1 &
FATRAIN_AUTOTUNE=0 timeout 300 python3 -m pytest -q tests/test_flash_v2.py -k "gpu and every_autotune" > $OUT/gpu_tests_c.log 2>&1 &
wait
tail -2 $OUT/gpu_tests_a.log $OUT/gpu_tests_b.log $OUT/gpu_tests_c.log; grep -E "^(FAILED|ERROR)|Error" $OUT/gpu_tests_*.log | head
date -u
