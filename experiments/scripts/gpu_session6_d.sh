#!/usr/bin/env bash
# Session 6, GPU call D (about 9 minutes on an H100): dQ by bulk reduce-adds (TMA) in the
# deterministic=False backward.
#   1. fatrain-bench modes fwd/bwd/fwdbwd, flash_v2 beside flash_v2_atomic and cuDNN, d=64
#      causal 8k/16k (the training shapes) and d=128 8k, 3 rounds
#   2. the atomic-dQ GPU tests (autotuning off)
#   3. training, GPT-2 small bf16 eager 32k tokens/step 30 steps at 8k and 16k: flash_v2,
#      sdpa_flash, sdpa_cudnn (one sweep) and flash_v2 with attention.deterministic=false
# Usage: OUT=<folder> bash experiments/scripts/gpu_session6_d.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=offline PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u
B="python3 -m fatrain.bench bench=targets out_dir=$OUT name=atomic_tma modes=[fwd,bwd,fwdbwd] plot=false"
timeout 170 $B impls=[flash_v2,flash_v2_atomic,sdpa_cudnn] headdims=[64] seqlens=[8192,16384] causal=[true] > $OUT/bench_a.log 2>&1
echo "bench a exit $?"
timeout 80 $B impls=[flash_v2,flash_v2_atomic,sdpa_cudnn] headdims=[128] seqlens=[8192] causal=[false] append=true > $OUT/bench_b.log 2>&1
echo "bench b exit $?"
python3 - <<PY
import csv
for r in csv.DictReader(open("$OUT/atomic_tma.csv")):
    print(r["impl"], r["mode"], r["causal"], r["seqlen"], r["headdim"], r["ms"], round(float(r["tflops"]), 1), r["status"])
PY
FATRAIN_AUTOTUNE=0 timeout 60 python3 -m pytest -q tests/test_flash_v2.py -k "gpu and atomic" > $OUT/gpu_tests.log 2>&1
echo "tests exit $?"; tail -1 $OUT/gpu_tests.log
WORK=/tmp/fatrain_s6; mkdir -p $WORK
timeout 170 python3 -m fatrain.train -m experiment=ablate_backends hydra.sweep.dir=$WORK/ablate \
  attention=flash_v2,sdpa_flash,sdpa_cudnn data.seq_len=8192,16384 > $WORK/sweep.log 2>&1
echo "sweep exit $?"
timeout 90 python3 -m fatrain.train -m experiment=ablate_backends hydra.sweep.dir=$WORK/atomic \
  attention=flash_v2 attention.deterministic=false data.seq_len=8192,16384 > $WORK/sweep_atomic.log 2>&1
echo "sweep atomic exit $?"
rm -rf $WORK/*/*/checkpoints $WORK/*/*/wandb
tar -C $WORK -cf $OUT/jobs.tar ablate atomic
for s in ablate atomic; do
  python3 -m fatrain.report $WORK/$s --out $OUT/report_$s > $OUT/report_$s.log 2>&1; echo "report $s exit $?"
  head -12 $OUT/report_$s/report.md
done
