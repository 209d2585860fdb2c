#!/usr/bin/env bash
# Session 8, GPU call C (about 6 minutes on an H100): the Triton cross-entropy (GPU tests in bf16,
# fp16, fp32; timing and extra memory against PyTorch's loss at GPT-2 small's output), then the
# training grid at the two target lengths with both fused kernels (RoPE, loss), each job from an
# empty allocator cache, logging the requested-bytes peak beside max_memory_allocated.
# Usage: OUT=<folder> bash experiments/scripts/gpu_session8_c.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=offline PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
timeout 120 python3 -m pytest -q tests/test_cross_entropy.py -k gpu > $OUT/tests.log 2>&1
echo "tests exit $?"; tail -2 $OUT/tests.log
timeout 60 python3 experiments/cross_entropy_bench.py > $OUT/ce_bench.jsonl 2>&1; echo "ce bench exit $?"
cat $OUT/ce_bench.jsonl
WORK=/tmp/fatrain_s8c; SWEEP=$WORK/ablate; mkdir -p $WORK
timeout 330 python3 -m fatrain.train -m experiment=ablate_backends hydra.sweep.dir=$SWEEP \
  attention=flash_v2,sdpa_flash,sdpa_cudnn data.seq_len=8192,16384 > $WORK/sweep.log 2>&1
echo "sweep exit $?"; date -u
tail -5 $WORK/sweep.log > $OUT/sweep_tail.log
rm -rf $SWEEP/*/checkpoints $SWEEP/*/wandb
tar -C $SWEEP -cf $OUT/jobs.tar .
python3 -m fatrain.report $SWEEP --out $WORK/report > $OUT/report.log 2>&1; echo "report exit $?"
cp $WORK/report/report.csv $OUT/ 2>/dev/null
python3 - <<PY
import csv
for r in csv.DictReader(open("$WORK/report/report.csv")):
    print(r["backend"], r["seq_len"], r["status"], round(float(r["tokens_per_sec"] or 0)), r["peak_allocated_gib"],
          r["peak_requested_gib"], r["final_val_loss"])
PY
date -u
