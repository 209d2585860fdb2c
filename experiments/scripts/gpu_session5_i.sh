#!/usr/bin/env bash
# Session 5, GPU call I (about 5 minutes on an H100): the backward passes one config at a time
# where call G missed (issue 3): d=128 non-causal N=8192 (vs Flex), d=64 causal N=32768.
# Usage: OUT=<folder> bash experiments/scripts/gpu_session5_i.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=disabled PYTHONUNBUFFERED=1 TRITON_PRINT_AUTOTUNING=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,power.draw,temperature.gpu --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
P="python3 experiments/flash_v2_pass_configs.py --passes dkdv dq"
[ "${SKIP_D128:-0}" = 1 ] || timeout 170 $P --headdims 128 --seqlens 8192 --causal 0 > $OUT/bwd_d128_nc.log 2>&1; echo "d128 exit $?"
grep "^|" $OUT/bwd_d128_nc.log
timeout 170 $P --headdims 64 --seqlens 32768 --causal 1 > $OUT/bwd_d64_c32k.log 2>&1; echo "d64 exit $?"
grep "^|" $OUT/bwd_d64_c32k.log
