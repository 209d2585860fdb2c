#!/usr/bin/env bash
# Session 7, GPU call D (about 4 minutes on an H100): grids (B * H, blocks) so that every head's
# heaviest causal block starts first (_BH_FIRST), against (blocks, B * H), A/B in alternating
# rounds: d=64 causal 8k and 16k, d=128 causal and non-causal 8k.
# Usage: OUT=<folder> bash experiments/scripts/gpu_session7_d.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=disabled PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u
timeout 200 python3 experiments/flash_v2_bwd_ab.py --switch _BH_FIRST --seqlens 8192 16384 --headdims 64 \
  --causal 1 --skip-host > $OUT/ab_bh_d64.txt 2>&1
echo "ab d64 exit $?"; grep '"test": "_BH_FIRST"' $OUT/ab_bh_d64.txt; grep -i "error" $OUT/ab_bh_d64.txt | head -5
timeout 200 python3 experiments/flash_v2_bwd_ab.py --switch _BH_FIRST --seqlens 8192 --headdims 128 \
  --causal 1 0 --skip-host > $OUT/ab_bh_d128.txt 2>&1
echo "ab d128 exit $?"; grep '"test": "_BH_FIRST"' $OUT/ab_bh_d128.txt; grep -i "error" $OUT/ab_bh_d128.txt | head -5
date -u
