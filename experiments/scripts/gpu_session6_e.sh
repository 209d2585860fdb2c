#!/usr/bin/env bash
# Session 6, GPU calls E and F (about 6 minutes each on an H100): issue 3's targets for one head
# dim per call (HD=64, then HD=128; both in one call exceed the 10-minute limit with 3 rounds):
# flash_v2, SDPA flash and cuDNN at 2k-32k (bench=targets: fwd and fwd+bwd, 3 rounds
# round-robin, median), then FlexAttention at 8192 appended.
#   then (TESTS_K=<pytest -k expression>) flash_v2 GPU tests, autotuning off.
# Usage: OUT=<folder> HD=64|128 [TESTS_K=...] bash experiments/scripts/gpu_session6_e.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"; HD=${HD:-64}
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=disabled PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,power.draw,temperature.gpu --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $OUT/env_d$HD.txt 2>&1
cat $OUT/env_d$HD.txt
B="python3 -m fatrain.bench bench=targets out_dir=$OUT name=attention_targets_h100_s6_d$HD headdims=[$HD]"
timeout 440 $B impls=[flash_v2,sdpa_flash,sdpa_cudnn] plot=false > $OUT/targets_d$HD.log 2>&1
echo "targets exit $?"
timeout 100 $B impls=[flex] seqlens=[8192] append=true plot=false > $OUT/flex_d$HD.log 2>&1; echo "flex exit $?"
nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv,noheader; date -u
python3 -c "from fatrain.bench import summarize; summarize('$OUT/attention_targets_h100_s6_d$HD.csv')" > $OUT/summary_d$HD.md 2>&1
tail -25 $OUT/summary_d$HD.md
if [ -n "${TESTS_K:-}" ]; then
  FATRAIN_AUTOTUNE=0 timeout 200 python3 -m pytest -q tests/test_flash_v2.py -k "$TESTS_K" > $OUT/gpu_tests_d$HD.log 2>&1
  echo "tests exit $?"; tail -1 $OUT/gpu_tests_d$HD.log; grep -E "^(FAILED|ERROR)" $OUT/gpu_tests_d$HD.log | head
fi
