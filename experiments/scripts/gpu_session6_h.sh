#!/usr/bin/env bash
# Session 6, GPU call H (about 8 minutes on an H100): issue 7's item 4 on the GPU.
#   1. fatrain-max-context for flash_v2 with activation checkpointing (64k up, 16k granularity)
#   2. training with torch.compile of the model: flash_v2 and sdpa_flash at seq_len 8192
#      (experiment=ablate_backends, trainer.compile=true), then fatrain-report
# Usage: OUT=<folder> bash experiments/scripts/gpu_session6_h.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=offline PYTHONUNBUFFERED=1
WORK=/tmp/fatrain_s6h; mkdir -p $WORK
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u
FATRAIN_AUTOTUNE=0 timeout 240 python3 -m fatrain.max_context --backends flash_v2 --start 65536 --granularity 16384 \
  --limit 262144 --out $OUT/maxctx_ckpt trainer.activation_checkpointing=true > $OUT/maxctx_ckpt.log 2>&1
echo "max_context exit $?"; cat $OUT/maxctx_ckpt/max_context.csv; date -u
timeout 270 python3 -m fatrain.train -m experiment=ablate_backends hydra.sweep.dir=$WORK/compiled \
  attention=flash_v2,sdpa_flash data.seq_len=8192 trainer.compile=true > $WORK/sweep.log 2>&1
echo "compiled sweep exit $?"; tail -3 $WORK/sweep.log; date -u
rm -rf $WORK/compiled/*/checkpoints $WORK/compiled/*/wandb
tar -C $WORK -cf $OUT/jobs.tar compiled
python3 -m fatrain.report $WORK/compiled --out $WORK/report > $OUT/report.log 2>&1; echo "report exit $?"
head -16 $WORK/report/report.md
