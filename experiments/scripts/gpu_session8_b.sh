#!/usr/bin/env bash
# Session 8, GPU call B (about 8 minutes on an H100): the fused RoPE kernel (GPU tests in bf16/fp16,
# timing against the PyTorch ops), the atomic-dQ pass under torch.compile, where the peak memory
# of a GPT-2 small step comes from (flash_v2 vs SDPA flash at 8k, allocator history), and the
# training grid at the two target lengths with the fused RoPE (flash_v2, SDPA flash, cuDNN).
# Usage: OUT=<folder> bash experiments/scripts/gpu_session8_b.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=offline PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
FATRAIN_AUTOTUNE=0 timeout 150 python3 -m pytest -q tests/test_rope.py tests/test_flash_v2.py \
  -k "gpu and (rope or atomic_dq)" > $OUT/tests.log 2>&1
echo "tests exit $?"; tail -2 $OUT/tests.log
timeout 60 python3 experiments/rope_bench.py > $OUT/rope_bench.jsonl 2>&1; echo "rope bench exit $?"
cat $OUT/rope_bench.jsonl
for b in flash_v2 sdpa_flash; do
  timeout 120 python3 experiments/memory_peak.py --out $OUT/memory --label $b -- experiment=ablate_backends \
    attention=$b data.seq_len=8192 trainer.max_steps=4 logger.wandb.mode=disabled > $OUT/memory_$b.log 2>&1
  echo "memory $b exit $?"; grep -v Warning $OUT/memory_$b.log | tail -28
done
WORK=/tmp/fatrain_s8b; SWEEP=$WORK/ablate; mkdir -p $WORK
timeout 300 python3 -m fatrain.train -m experiment=ablate_backends hydra.sweep.dir=$SWEEP \
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
    print(r["backend"], r["seq_len"], r["status"], round(float(r["tokens_per_sec"] or 0)), r["peak_allocated_gib"], r["final_val_loss"])
PY
date -u
