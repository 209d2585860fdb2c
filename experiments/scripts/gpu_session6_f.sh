#!/usr/bin/env bash
# Session 6, GPU call F (about 8 minutes on an H100): the record run of issue 3's targets, both
# head dims in one run: flash_v2, SDPA flash and cuDNN at 2k-32k (bench=targets: fwd and
# fwd+bwd, 3 rounds round-robin, median), then FlexAttention at 8192 appended, the summary and
# the plot; then the flash_v2 GPU tests call E did not run (autotuning off).
# Usage: OUT=<folder> bash experiments/scripts/gpu_session6_f.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=disabled PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,power.draw,temperature.gpu --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
B="python3 -m fatrain.bench bench=targets out_dir=$OUT name=attention_targets_h100_s6"
timeout 400 $B impls=[flash_v2,sdpa_flash,sdpa_cudnn] plot=false > $OUT/targets.log 2>&1
echo "targets exit $?"
timeout 100 $B impls=[flex] seqlens=[8192] append=true > $OUT/flex.log 2>&1; echo "flex exit $?"
nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv,noheader; date -u
python3 -c "from fatrain.bench import summarize; summarize('$OUT/attention_targets_h100_s6.csv')" > $OUT/summary.md 2>&1
tail -2 $OUT/summary.md
FATRAIN_AUTOTUNE=0 timeout 80 python3 -m pytest -q tests/test_flash_v2.py -k "gpu and not matches_reference" > $OUT/gpu_tests.log 2>&1
echo "tests exit $?"; tail -1 $OUT/gpu_tests.log; grep -E "^(FAILED|ERROR)" $OUT/gpu_tests.log | head
