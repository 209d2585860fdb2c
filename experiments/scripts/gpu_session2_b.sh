#!/usr/bin/env bash
# Session 2, GPU call B (about 8 minutes on an H100):
#   1. the GPU tests of dropout and the features (after the generator rewrite)
#   2. dropout cost in flash_v2 at 16 and 8 random bits per element (fatrain-bench features preset)
#   3. flash_v1 block sizes (on-chip budget M) and warps against naive (experiments/flash_v1_timing.py)
#   4. issue 5's window and packed-document rows (fatrain-bench features preset)
# Usage: OUT=<folder> bash experiments/scripts/gpu_session2_b.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=disabled PYTHONUNBUFFERED=1
FATRAIN_AUTOTUNE=0 timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -n 12 -rfE \
  tests/test_features.py tests/test_flash_v2.py > $OUT/gpu_tests_b.log 2>&1
echo "tests exit $?"; grep -E "passed|failed|FAILED|ERROR" $OUT/gpu_tests_b.log | tail -15
for bits in 16 8; do
  FATRAIN_DROPOUT_BITS=$bits timeout 100 python3 -m fatrain.bench bench=features impls=[flash_v2] windows=[-1] \
    doc_lens=[0] dropout_ps=[0.0,0.1] seqlens=[16384] out_dir=$OUT name=dropout_bits$bits plot=false \
    > $OUT/dropout_bits$bits.log 2>&1
  echo "bits $bits exit $?"; cut -d, -f1-5,9,10,15 $OUT/dropout_bits$bits.csv
done
timeout 120 python3 experiments/flash_v1_timing.py --stages 1 --sram-bytes 0 464896 --warps 0 8 \
  --seqlens 8192 --headdims 64 128 > $OUT/flash_v1_blocks.log 2>&1
echo "v1 exit $?"; grep "^|" $OUT/flash_v1_blocks.log
B="python3 -m fatrain.bench bench=features impls=[flash_v2] out_dir=$OUT name=attention_features_h100 plot=false"
timeout 90 $B windows=[-1,1024] doc_lens=[0] dropout_ps=[0.0] seqlens=[32768] > $OUT/features.log 2>&1
timeout 90 $B windows=[-1] doc_lens=[0,2048] dropout_ps=[0.0] seqlens=[16384] append=true >> $OUT/features.log 2>&1
echo "features exit $?"; cut -d, -f1-5,9,10,13,14,15 $OUT/attention_features_h100.csv
