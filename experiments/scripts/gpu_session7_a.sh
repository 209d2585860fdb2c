#!/usr/bin/env bash
# Session 7, GPU call A (about 8 minutes on an H100): the dK/dV pass reading the rows' LSE and
# Delta through 1-D descriptors (_STATS_TMA) against pointer loads, A/B in alternating rounds
# (d=64 causal 8k and 16k, d=128 causal 8k), then fatrain-bench at the two training shapes
# (d=64 causal 8k and 16k, fwd and fwd+bwd, flash_v2 and its atomic-dQ variant beside SDPA flash
# and cuDNN, 3 rounds).
# Usage: OUT=<folder> bash experiments/scripts/gpu_session7_a.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=disabled PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u
timeout 300 python3 experiments/flash_v2_bwd_ab.py --switch _STATS_TMA --seqlens 8192 16384 --headdims 64 \
  --causal 1 > $OUT/ab_d64.txt 2>&1
echo "ab d64 exit $?"; grep '"test": "_STATS_TMA"' $OUT/ab_d64.txt; grep -i error $OUT/ab_d64.txt | head -5
timeout 120 python3 experiments/flash_v2_bwd_ab.py --switch _STATS_TMA --seqlens 8192 --headdims 128 \
  --causal 1 --skip-host > $OUT/ab_d128.txt 2>&1
echo "ab d128 exit $?"; grep '"test": "_STATS_TMA"' $OUT/ab_d128.txt; grep -i error $OUT/ab_d128.txt | head -5
timeout 150 python3 -m fatrain.bench bench=targets out_dir=$OUT name=train_shapes \
  impls=[flash_v2,flash_v2_atomic,sdpa_flash,sdpa_cudnn] headdims=[64] seqlens=[8192,16384] causal=[true] \
  plot=false > $OUT/train_shapes.log 2>&1
echo "bench exit $?"; tail -3 $OUT/train_shapes.log
python3 - <<PY
import csv
for r in csv.DictReader(open("$OUT/train_shapes.csv")):
    print(r["impl"], r["mode"], r["causal"], r["seqlen"], r["headdim"], r["ms"], round(float(r["tflops"]), 1), r["status"])
PY
date -u
