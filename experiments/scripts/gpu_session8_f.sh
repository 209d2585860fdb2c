#!/usr/bin/env bash
# Session 8, GPU call F (about 9 minutes on an H100): issue 7's block-size ablation in training
# (flash_v2 tiles BLOCK_M x BLOCK_N, flash_v1 on-chip budget M; GPT-2 small, 8k, 32k tokens/step),
# then flash_v1's max_context (call E's search was cut by its time limit).
# Usage: OUT=<folder> bash experiments/scripts/gpu_session8_f.sh  (everything comes back in f.tar)
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=offline PYTHONUNBUFFERED=1
WORK=/tmp/fatrain_s8f; mkdir -p $WORK/res
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $WORK/res/env.txt 2>&1
cat $WORK/res/env.txt
timeout 250 python3 -m fatrain.train -m experiment=block_sizes hydra.sweep.dir=$WORK/bs_v2 > $WORK/res/bs_v2.log 2>&1
echo "block_sizes flash_v2 exit $?"; date -u
timeout 130 python3 -m fatrain.train -m experiment=block_sizes hydra.sweep.dir=$WORK/bs_v1 attention=flash_v1 \
  attention.block_m=null attention.block_n=null attention.sram_bytes=16384,32768,65536,131072 > $WORK/res/bs_v1.log 2>&1
echo "block_sizes flash_v1 exit $?"; date -u
for d in bs_v2 bs_v1; do
  rm -rf $WORK/$d/*/checkpoints $WORK/$d/*/wandb
  python3 -m fatrain.report $WORK/$d --out $WORK/res/report_$d --baseline none > /dev/null 2>&1
  head -16 $WORK/res/report_$d/report.md | tail -10
done
FATRAIN_AUTOTUNE=0 WANDB_MODE=disabled timeout 190 python3 -m fatrain.max_context --backends flash_v1 \
  --out $WORK/res/maxctx_flash_v1 > $WORK/res/maxctx_flash_v1.log 2>&1
echo "max_context flash_v1 exit $?"; grep -v Warn $WORK/res/maxctx_flash_v1.log | tail -6; date -u
tar -C $WORK -cf $OUT/f.tar res bs_v2 bs_v1
