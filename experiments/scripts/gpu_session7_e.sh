#!/usr/bin/env bash
# Session 7, GPU call E (about 3 minutes on an H100): issue 3's targets on the session-7 kernels
# at 2k and 8k only (the device time left): flash_v2, SDPA flash and cuDNN, both head dims,
# causal and not, fwd and fwd+bwd, 3 rounds round-robin, median; then the summary.
# Usage: OUT=<folder> bash experiments/scripts/gpu_session7_e.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=disabled PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
timeout 280 python3 -m fatrain.bench bench=targets out_dir=$OUT name=attention_targets_h100_s7 \
  impls=[flash_v2,sdpa_flash,sdpa_cudnn] seqlens=[2048,8192] plot=false > $OUT/targets.log 2>&1
echo "targets exit $?"; date -u
python3 -c "from fatrain.bench import summarize; summarize('$OUT/attention_targets_h100_s7.csv')" > $OUT/summary.md 2>&1
cat $OUT/summary.md | tail -25
