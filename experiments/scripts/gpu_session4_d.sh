#!/usr/bin/env bash
# Session 4, GPU call D (about 5 minutes on an H100): the full issue-7 training grid,
# flash_v1 included now that it splits (issue 4), then fatrain-report.
#   GPT-2 small, bf16 eager, 32k tokens/step, 30 steps; BACKENDS x seq_len 1k/2k/4k/8k/16k
# Usage: OUT=<folder> [BACKENDS=naive,flash_v1,flash_v2,sdpa_flash,sdpa_cudnn] bash experiments/scripts/gpu_session4_d.sh
# (job folders come back as jobs.tar: their names hold '=' and ',')
set -u
BACKENDS=${BACKENDS:-naive,flash_v1,flash_v2,sdpa_flash,sdpa_cudnn}
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=offline PYTHONUNBUFFERED=1
WORK=/tmp/fatrain_s4; SWEEP=$WORK/ablate; mkdir -p $WORK
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
timeout 520 python3 -m fatrain.train -m experiment=ablate_backends hydra.sweep.dir=$SWEEP \
  attention=$BACKENDS data.seq_len=1024,2048,4096,8192,16384 > $WORK/sweep.log 2>&1
echo "sweep exit $?"
tail -5 $WORK/sweep.log > $OUT/sweep_tail.log
rm -rf $SWEEP/*/checkpoints $SWEEP/*/wandb
tar -C $SWEEP -cf $OUT/jobs.tar .
python3 -m fatrain.report $SWEEP --out $OUT/report > $OUT/report.log 2>&1; echo "report exit $?"
head -40 $OUT/report/report.md
