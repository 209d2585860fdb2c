#!/usr/bin/env bash
# Session 4, GPU call F (about 9 minutes on an H100): flash_v2 with two more forward configs and
# 300 ms autotune repetitions (issue 3)
#   1. the forward one config at a time vs autotuned, d=128, N 8k/16k (did the autotuner pick better?)
#   2. bench=targets at d=128 (flash_v2, SDPA flash, cuDNN) + FlexAttention at 8192
# Usage: OUT=<folder> HD=128 bash experiments/scripts/gpu_session4_f.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; HD=${HD:-128}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=disabled PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
timeout 150 python3 experiments/flash_v2_fwd_configs.py --seqlens 8192 16384 --headdims $HD > $OUT/fwd.log 2>&1
echo "fwd configs exit $?"; grep -E "^\| (autotuned|flex|pinned \((128, 64, 8, 5|256, 64, 16, 3|128, 128, 8, 3)\))" $OUT/fwd.log
B="python3 -m fatrain.bench bench=targets headdims=[$HD] out_dir=$OUT name=targets_d$HD"
timeout 300 $B impls=[flash_v2,sdpa_flash,sdpa_cudnn] plot=false > $OUT/targets.log 2>&1; echo "targets exit $?"
timeout 100 $B impls=[flex] seqlens=[8192] append=true plot=false > $OUT/flex.log 2>&1; echo "flex exit $?"
python3 -c "from fatrain.bench import summarize; summarize('$OUT/targets_d$HD.csv')" 2>&1 | tail -25
