#!/usr/bin/env bash
# Session 5, GPU call D (about 9 minutes on an H100): (1) where short-timing noise comes from;
# (2) flash_v2 passes one config at a time at head dim 64 (issue 3), autotuner with compile-first warm-up.
# Usage: OUT=<folder> bash experiments/scripts/gpu_session5_d.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=disabled PYTHONUNBUFFERED=1 TRITON_PRINT_AUTOTUNING=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,power.draw,temperature.gpu --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
timeout 120 python3 experiments/bench_noise.py --seqlen 2048 --headdim 128 > $OUT/noise.log 2>&1; echo "noise exit $?"
grep "^|" $OUT/noise.log
P="python3 experiments/flash_v2_pass_configs.py --headdims 64 --seqlens 2048 8192"
timeout 230 $P --passes fwd --causal 1 0 > $OUT/fwd_d64.log 2>&1; echo "fwd exit $?"
grep "^|" $OUT/fwd_d64.log
timeout 200 $P --passes dkdv dq --causal 1 > $OUT/bwd_d64.log 2>&1; echo "bwd exit $?"
grep "^|" $OUT/bwd_d64.log
