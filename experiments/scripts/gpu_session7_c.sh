#!/usr/bin/env bash
# Session 7, GPU call C (about 6 minutes on an H100): issue 7's training grid on the session-7
# kernels (LSE and Delta descriptors, base-2 LSE in the dK/dV pass) for the backends the speed targets compare (flash_v2, sdpa_flash, sdpa_cudnn) at
# seq_len 1k-16k (naive and flash_v1 unchanged since session 5), then fatrain-report.
#   GPT-2 small, bf16 eager, 32k tokens/step, 30 steps
# Usage: OUT=<folder> bash experiments/scripts/gpu_session7_c.sh
# (job folders come back as jobs.tar: their names hold '=' and ',')
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=offline PYTHONUNBUFFERED=1
WORK=/tmp/fatrain_s7c; SWEEP=$WORK/ablate; mkdir -p $WORK
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
timeout 450 python3 -m fatrain.train -m experiment=ablate_backends hydra.sweep.dir=$SWEEP \
  attention=flash_v2,sdpa_flash,sdpa_cudnn data.seq_len=1024,2048,4096,8192,16384 > $WORK/sweep.log 2>&1
echo "sweep exit $?"; date -u
tail -5 $WORK/sweep.log > $OUT/sweep_tail.log
rm -rf $SWEEP/*/checkpoints $SWEEP/*/wandb
tar -C $SWEEP -cf $OUT/jobs.tar .
python3 -m fatrain.report $SWEEP --out $WORK/report > $OUT/report.log 2>&1; echo "report exit $?"
head -30 $WORK/report/report.md
