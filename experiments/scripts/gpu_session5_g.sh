#!/usr/bin/env bash
# Session 5, GPU call G (about 7 minutes on an H100): issue 3's targets in one run, both head
# dims: flash_v2, SDPA flash, cuDNN at 2k-32k, then FlexAttention at 8192, the summary and plots.
# Usage: OUT=<folder> bash experiments/scripts/gpu_session5_g.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=disabled PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,power.draw,temperature.gpu --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
B="python3 -m fatrain.bench bench=targets out_dir=$OUT name=attention_targets_h100_s5"
TRITON_PRINT_AUTOTUNING=1 timeout 420 $B impls=[flash_v2,sdpa_flash,sdpa_cudnn] plot=false > $OUT/targets.log 2>&1
echo "targets exit $?"
timeout 120 $B impls=[flex] seqlens=[8192] append=true > $OUT/flex.log 2>&1; echo "flex exit $?"
python3 -c "from fatrain.bench import summarize; summarize('$OUT/attention_targets_h100_s5.csv')" > $OUT/summary.md 2>&1
tail -45 $OUT/summary.md
