#!/usr/bin/env bash
# Session 6, GPU call C (about 8 minutes on an H100): the forward gap again after the V load
# moved next to K's (experiments/flash_v2_fwd_gap.py), then the 32 flash_v2 GPU tests in two
# processes at once (autotuning off), then fatrain-bench at the two training shapes
# (d=64 causal 8k and 16k, fwd and fwd+bwd, flash_v2 beside SDPA flash and cuDNN, 3 rounds).
# Usage: OUT=<folder> bash experiments/scripts/gpu_session6_c.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=disabled PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u
timeout 200 python3 experiments/flash_v2_fwd_gap.py > $OUT/fwd_gap.txt 2>&1
echo "fwd_gap exit $?"; grep "^|" $OUT/fwd_gap.txt; grep error $OUT/fwd_gap.txt | head -5
FATRAIN_AUTOTUNE=0 timeout 240 python3 -m pytest -q tests/test_flash_v2.py -k "gpu and matches_reference" > $OUT/gpu_tests_a.log 2>&1 &
FATRAIN_AUTOTUNE=0 timeout 240 python3 -m pytest -q tests/test_flash_v2.py -k "gpu and not matches_reference" > $OUT/gpu_tests_b.log 2>&1 &
wait
tail -2 $OUT/gpu_tests_a.log $OUT/gpu_tests_b.log; grep -E "^(FAILED|ERROR)" $OUT/gpu_tests_*.log | head
timeout 150 python3 -m fatrain.bench bench=targets out_dir=$OUT name=train_shapes impls=[flash_v2,sdpa_flash,sdpa_cudnn] \
  headdims=[64] seqlens=[8192,16384] causal=[true] plot=false > $OUT/train_shapes.log 2>&1
echo "bench exit $?"
python3 - <<PY
import csv
for r in csv.DictReader(open("$OUT/train_shapes.csv")):
    print(r["impl"], r["mode"], r["causal"], r["seqlen"], r["headdim"], r["ms"], round(float(r["tflops"]), 1), r["status"])
PY
