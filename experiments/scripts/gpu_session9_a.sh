#!/usr/bin/env bash
# Session 9, GPU call A (about 8 minutes on an H100): flash_v2's passes one configuration at a time
# at the training shapes of issue 7 (GPT-2 small: 12 heads of 64, 32k tokens, causal bf16, 8k and
# 16k), with register caps (maxnreg) so that two 8-warp programs share an SM, and 16-warp 256-row
# tiles; SDPA's cuDNN backend on the same inputs. The autotuner's picks are printed too.
# Usage: OUT=<folder> bash experiments/scripts/gpu_session9_a.sh  (everything comes back in a.tar)
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
WORK=/tmp/fatrain_s9a; mkdir -p $WORK/res
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $WORK/res/env.txt 2>&1
cat $WORK/res/env.txt
TRITON_PRINT_AUTOTUNING=1 timeout 540 python3 experiments/flash_v2_pass_configs.py --passes fwd dkdv dq \
  --headdims 64 --seqlens 8192 16384 --causal 1 --tokens 32768 --heads 12 --only-extra --cudnn \
  > $WORK/res/pass_configs.log 2>&1
echo "pass configs exit $?"; grep -v '^{' $WORK/res/pass_configs.log | tail -60; date -u
tar -C $WORK -cf $OUT/a.tar res
