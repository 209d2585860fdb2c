#!/usr/bin/env bash
# Session 5, GPU call E/F (about 8 minutes on an H100 each): flash_v2 with TMA descriptors, the
# session's config lists, Delta in the dQ pass (issue 3)
#   1. (TESTS=1) the flash_v2 GPU tests with the first config of each list (FATRAIN_AUTOTUNE=0)
#   2. bench=targets at head dim $HD: flash_v2, SDPA flash, cuDNN; FlexAttention at 8192
#   3. (TESTS_K=<pytest -k expression>) GPU tests after the benchmark
# Usage: OUT=<folder> HD=128 TESTS=1 bash experiments/scripts/gpu_session5_e.sh (call E)
#        OUT=<folder> HD=64 TESTS=0 TESTS_K="compiled or autocast or ..." bash ... (call F)
set -u
OUT=${OUT:-/tmp/fatrain_out}; HD=${HD:-128}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=disabled PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,power.draw,temperature.gpu --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
if [ "${TESTS:-1}" = 1 ]; then
  FATRAIN_AUTOTUNE=0 timeout 170 python3 -m pytest -q tests/test_flash_v2.py -k gpu > $OUT/gpu_tests.log 2>&1
  echo "tests exit $?"; tail -3 $OUT/gpu_tests.log
fi
B="python3 -m fatrain.bench bench=targets headdims=[$HD] out_dir=$OUT name=targets_d$HD"
TRITON_PRINT_AUTOTUNING=1 timeout ${TARGETS_S:-330} $B impls=[flash_v2,sdpa_flash,sdpa_cudnn] plot=false > $OUT/targets.log 2>&1
echo "targets exit $?"
timeout 80 $B impls=[flex] seqlens=[8192] append=true plot=false > $OUT/flex.log 2>&1; echo "flex exit $?"
python3 -c "from fatrain.bench import summarize; summarize('$OUT/targets_d$HD.csv')" 2>&1 | tail -25
if [ -n "${TESTS_K:-}" ]; then
  FATRAIN_AUTOTUNE=0 timeout 200 python3 -m pytest -q tests/test_flash_v2.py -k "gpu and ($TESTS_K)" -rA > $OUT/gpu_tests_k.log 2>&1
  echo "tests -k exit $?"; grep -E "^(PASSED|FAILED|ERROR)|passed|failed" $OUT/gpu_tests_k.log | tail -30
fi
