#!/usr/bin/env bash
# Session 5, GPU call C (about 9 minutes on an H100): flash_v2 with TMA descriptors, each pass one
# launch configuration at a time (issue 3: which configs the autotune lists should hold).
# Usage: OUT=<folder> HD=128 bash experiments/scripts/gpu_session5_c.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; HD=${HD:-128}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=disabled PYTHONUNBUFFERED=1 TRITON_PRINT_AUTOTUNING=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,power.draw,temperature.gpu --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
P="python3 experiments/flash_v2_pass_configs.py --headdims $HD --seqlens 2048 8192"
timeout ${BWD_S:-300} $P --passes dkdv dq --causal 1 > $OUT/bwd_d$HD.log 2>&1; echo "bwd exit $?"
grep -v "^{" $OUT/bwd_d$HD.log | grep -v "^Triton autotuning" | tail -30
timeout ${FWD_S:-200} $P --passes fwd --causal 1 0 > $OUT/fwd_d$HD.log 2>&1; echo "fwd exit $?"
grep -v "^{" $OUT/fwd_d$HD.log | grep -v "^Triton autotuning" | tail -16
