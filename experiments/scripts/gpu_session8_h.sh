#!/usr/bin/env bash
# Session 8, GPU call H (about 8 minutes on an H100): issue 7's item 4 on the session-8 model.
#   1. training with torch.compile of the model (under compile the model takes PyTorch's RoPE and
#      loss, which Inductor fuses): flash_v2 and sdpa_flash at seq_len 8192, then fatrain-report
#   2. fatrain-max-context for flash_v2 with activation checkpointing (128k up, 32k granularity)
# Usage: OUT=<folder> bash experiments/scripts/gpu_session8_h.sh  (everything comes back in h.tar)
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=offline PYTHONUNBUFFERED=1
WORK=/tmp/fatrain_s8h; mkdir -p $WORK/res
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $WORK/res/env.txt 2>&1
cat $WORK/res/env.txt
timeout 260 python3 -m fatrain.train -m experiment=ablate_backends hydra.sweep.dir=$WORK/compiled \
  attention=flash_v2,sdpa_flash data.seq_len=8192 trainer.compile=true > $WORK/res/compiled.log 2>&1
echo "compiled sweep exit $?"; tail -2 $WORK/res/compiled.log; date -u
rm -rf $WORK/compiled/*/checkpoints $WORK/compiled/*/wandb
python3 -m fatrain.report $WORK/compiled --out $WORK/res/report_compiled > /dev/null 2>&1; echo "report exit $?"
sed -n 5,12p $WORK/res/report_compiled/report.md; grep -A5 "requested" $WORK/res/report_compiled/report.md | tail -4
FATRAIN_AUTOTUNE=0 WANDB_MODE=disabled timeout 290 python3 -m fatrain.max_context --backends flash_v2 --start 131072 \
  --granularity 32768 --limit 524288 --out $WORK/res/maxctx_ckpt trainer.activation_checkpointing=true \
  > $WORK/res/maxctx_ckpt.log 2>&1
echo "max_context exit $?"; grep -v Warn $WORK/res/maxctx_ckpt.log | tail -8; date -u
tar -C $WORK -cf $OUT/h.tar res compiled
