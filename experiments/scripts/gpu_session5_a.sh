#!/usr/bin/env bash
# Session 5, GPU call A (about 6 minutes on an H100): how flash_v2's forward loads K and V
# (pointer tiles transposed or not, TMA descriptors), pinned configs, beside flash_v2 and Flex (issue 3).
# Usage: OUT=<folder> bash experiments/scripts/gpu_session5_a.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=disabled PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
timeout 450 python3 experiments/flash_v2_load_probe.py --seqlens 2048 8192 --headdims 128 64 > $OUT/load_probe.log 2>&1
echo "probe exit $?"; grep -v "^{" $OUT/load_probe.log | tail -40
