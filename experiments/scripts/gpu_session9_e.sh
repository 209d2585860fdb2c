#!/usr/bin/env bash
# Session 9, GPU call E (about 3 minutes on an H100): the dK/dV pass with three 4-warp programs per SM
# (register cap 168) at the training shapes, beside the autotuned pick; the dQ pass's 64 x 64 tiles.
# Usage: OUT=<folder> bash experiments/scripts/gpu_session9_e.sh  (everything comes back in e.tar)
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
WORK=/tmp/fatrain_s9e; mkdir -p $WORK/res
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $WORK/res/env.txt 2>&1
cat $WORK/res/env.txt
timeout 400 python3 experiments/flash_v2_pass_configs.py --passes dkdv dq \
  --headdims 64 --seqlens 8192 16384 --causal 1 --tokens 32768 --heads 12 --only-extra \
  > $WORK/res/pass_configs.log 2>&1
echo "pass configs exit $?"; grep -v '^{' $WORK/res/pass_configs.log | tail -40; date -u
tar -C $WORK -cf $OUT/e.tar res
