#!/usr/bin/env bash
# The runs that session 2 could not fit (about 9 minutes on an H100; split it if the call limit is short):
#   1. training sweep at 8k and 16k (GPT-2 small, bf16, 32k tokens/step): tokens/s and valid peak memory
#      for flash_v2, SDPA flash and cuDNN (issue 7), then fatrain-report
#   2. dropout rows of bench=features with autotuning on, forward and forward+backward (issue 5)
#   3. flash_v1 with M doubled ((128, 128) blocks at d=128) and 8 warps, with error checks (issue 4)
# Usage: OUT=<folder> bash experiments/scripts/gpu_followup.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=offline PYTHONUNBUFFERED=1
WORK=/tmp/fatrain_followup; SWEEP=$WORK/ablate; mkdir -p $WORK
timeout 240 python3 -m fatrain.train -m experiment=ablate_backends hydra.sweep.dir=$SWEEP \
  attention=flash_v2,sdpa_flash,sdpa_cudnn data.seq_len=8192,16384 > $WORK/sweep.log 2>&1
echo "sweep exit $?"
python3 -m fatrain.report $SWEEP --out $OUT/report > $WORK/report.log 2>&1; sed -n 1,30p $OUT/report/report.md
timeout 150 python3 -m fatrain.bench bench=features impls=[flash_v2] windows=[-1] doc_lens=[0] \
  dropout_ps=[0.0,0.1] seqlens=[16384] out_dir=$OUT name=dropout_autotuned plot=false > $WORK/dropout.log 2>&1
echo "dropout exit $?"; cut -d, -f1-5,9,10,15 $OUT/dropout_autotuned.csv
timeout 120 python3 experiments/flash_v1_timing.py --stages 1 --sram-bytes 0 464896 --warps 0 8 \
  --seqlens 4096 8192 --headdims 64 128 --naive > $OUT/flash_v1_variants.log 2>&1
echo "v1 exit $?"; grep "^|" $OUT/flash_v1_variants.log
