#!/usr/bin/env bash
# Session 5, GPU call H (about 7 minutes on an H100): every GPU-marked test on the session's final
# kernels (autotuning off, three pytest processes at once), then flash_v1 and naive appended to
# call G's CSV (results/attention_targets_h100_s5.csv) to make results/attention_bench_h100.csv.
# Usage: OUT=<folder> bash experiments/scripts/gpu_session5_h.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=disabled PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,power.draw,temperature.gpu --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
T="timeout 250 python3 -m pytest -q -m gpu -p no:cacheprovider -rf"
FATRAIN_AUTOTUNE=0 $T tests/test_flash_v2.py > $OUT/gpu_tests_flash_v2.log 2>&1 &
FATRAIN_AUTOTUNE=0 $T tests/test_flash_v1.py tests/test_features.py > $OUT/gpu_tests_v1_features.log 2>&1 &
FATRAIN_AUTOTUNE=0 $T tests/test_bench.py tests/test_sweep.py tests/test_model.py tests/test_naive.py \
  tests/test_train.py tests/test_evaluate.py tests/test_sample.py > $OUT/gpu_tests_rest.log 2>&1 &
wait
for f in $OUT/gpu_tests_*.log; do echo "== $f"; grep -E "FAILED|ERROR" $f | head; tail -n 1 $f; done
cp experiments/results/attention_targets_h100_s5.csv $OUT/attention_bench_h100.csv
timeout 150 python3 -m fatrain.bench out_dir=$OUT name=attention_bench_h100 impls=[flash_v1,naive] \
  seqlens=[1024,2048,4096,8192,16384] modes=[fwd,fwdbwd] append=true > $OUT/bench_v1_naive.log 2>&1
echo "bench exit $?"; tail -3 $OUT/bench_v1_naive.log
