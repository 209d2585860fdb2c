#!/usr/bin/env bash
# Session 8, GPU call D (about 6 minutes on an H100): issue 7's full training grid on the session-8
# code (fused RoPE and cross-entropy kernels, every job from an empty allocator cache), then
# fatrain-report.  GPT-2 small, bf16 eager, 32k tokens/step, 30 steps; 5 backends x seq_len 1k-16k.
# Usage: OUT=<folder> bash experiments/scripts/gpu_session8_d.sh
# (job folders come back as jobs.tar: their names hold '=' and ',')
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=offline PYTHONUNBUFFERED=1
WORK=/tmp/fatrain_s8d; SWEEP=$WORK/ablate; mkdir -p $WORK
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
timeout 560 python3 -m fatrain.train -m experiment=ablate_backends hydra.sweep.dir=$SWEEP > $WORK/sweep.log 2>&1
echo "sweep exit $?"; date -u
tail -5 $WORK/sweep.log > $OUT/sweep_tail.log
rm -rf $SWEEP/*/checkpoints $SWEEP/*/wandb
tar -C $SWEEP -cf $OUT/jobs.tar .
python3 -m fatrain.report $SWEEP --out $WORK/report > $OUT/report.log 2>&1; echo "report exit $?"
cp $WORK/report/report.csv $WORK/report/report.md $OUT/ 2>/dev/null
head -60 $WORK/report/report.md
