#!/usr/bin/env bash
# Session 4, GPU call E (about 4 minutes on an H100): flash_v2's forward one configuration at a
# time, beside its autotuned pick and FlexAttention (issue 3: the N=8192 non-causal dip, Flex's lead).
# Usage: OUT=<folder> bash experiments/scripts/gpu_session4_e.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=disabled PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
timeout 330 python3 experiments/flash_v2_fwd_configs.py --seqlens 4096 8192 16384 --headdims 128 > $OUT/fwd_d128.log 2>&1
echo "d128 exit $?"; grep "^|" $OUT/fwd_d128.log; grep picked $OUT/fwd_d128.log | cut -c1-300
timeout 150 python3 experiments/flash_v2_fwd_configs.py --seqlens 8192 --headdims 64 > $OUT/fwd_d64.log 2>&1
echo "d64 exit $?"; grep "^|" $OUT/fwd_d64.log
