#!/usr/bin/env bash
# Session 6, GPU call A (about 9 minutes on an H100): overlapping the exp2s with wgmma.
# 1. experiments/flash_v2_overlap_probe.py: minimal TMA forward, straight loop vs pipelined vs
#    split P V, beside flash_v2 (autotuned) and Flex; d 64/128, N 2048/8192, causal and not.
# 2. experiments/flash_v2_bwd_ab.py: flash_v2 host overhead per call (and a cProfile), then the
#    dK/dV pass with dP^T issued before or after the exp2s (flash_v2._DP_FIRST), alternating rounds.
# Usage: OUT=<folder> bash experiments/scripts/gpu_session6_a.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=disabled PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u
timeout 300 python3 experiments/flash_v2_overlap_probe.py > $OUT/overlap.txt 2>&1
echo "overlap exit $?"; tail -12 $OUT/overlap.txt
timeout 240 python3 experiments/flash_v2_bwd_ab.py --rounds 2 > $OUT/bwd_ab.txt 2>&1
echo "bwd_ab exit $?"; grep -E "host_overhead|dp_first" $OUT/bwd_ab.txt
