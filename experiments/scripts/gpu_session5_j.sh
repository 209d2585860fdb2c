#!/usr/bin/env bash
# Session 5, GPU call J (about 2 minutes on an H100): is forward+backward more than forward plus
# backward? fatrain-bench modes fwd, bwd, fwdbwd where call G missed, flash_v2 beside SDPA flash and
# Flex, plus the backward launched directly (experiments/flash_v2_pass_configs.py, autotuned rows).
# Usage: OUT=<folder> bash experiments/scripts/gpu_session5_j.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=disabled PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u
B="python3 -m fatrain.bench bench=targets out_dir=$OUT name=modes modes=[fwd,bwd,fwdbwd] plot=false"
timeout 150 $B impls=[flash_v2,sdpa_flash,flex] headdims=[128] seqlens=[8192] causal=[false] > $OUT/modes_a.log 2>&1
echo "a exit $?"
timeout 150 $B impls=[flash_v2,sdpa_flash] headdims=[64] seqlens=[32768] causal=[true] append=true > $OUT/modes_b.log 2>&1
echo "b exit $?"
python3 - <<PY
import csv
for r in csv.DictReader(open("$OUT/modes.csv")):
    print(r["impl"], r["mode"], r["causal"], r["seqlen"], r["headdim"], r["ms"], r["tflops"], r["status"])
PY
