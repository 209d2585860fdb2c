#!/usr/bin/env bash
# Session 9, GPU call B (about 6 minutes on an H100): the kernels of each backend's forward and
# backward at the training shapes (profiler), and the deterministic=False dK/dV pass one
# configuration at a time, with the forward's new register-capped config in the autotune list.
# Usage: OUT=<folder> bash experiments/scripts/gpu_session9_b.sh  (everything comes back in b.tar)
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
WORK=/tmp/fatrain_s9b; mkdir -p $WORK/res
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $WORK/res/env.txt 2>&1
cat $WORK/res/env.txt
timeout 240 python3 experiments/attention_kernel_profile.py --out $WORK/res/profile.jsonl > $WORK/res/profile.log 2>&1
echo "profile exit $?"; grep -v "^ .*0\.0[0-9][0-9] ms" $WORK/res/profile.log | head -80; date -u
TRITON_PRINT_AUTOTUNING=1 timeout 300 python3 experiments/flash_v2_pass_configs.py --passes dkdv_atomic \
  --headdims 64 --seqlens 8192 16384 --causal 1 --tokens 32768 --heads 12 --only-extra \
  > $WORK/res/pass_configs_atomic.log 2>&1
echo "pass configs exit $?"; grep -v '^{' $WORK/res/pass_configs_atomic.log | grep -v "^Autotuning kernel" | tail -30; date -u
tar -C $WORK -cf $OUT/b.tar res
