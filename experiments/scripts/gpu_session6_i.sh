#!/usr/bin/env bash
# Session 6, GPU call I (about 9 minutes on an H100): the FlashAttention papers' sweep
# (bench=paper: 16k tokens, hidden 2048, seqlen 512-32k, causal and not, d 64/128, bf16,
# fwd / bwd / fwd+bwd) for flash_v2, SDPA flash and cuDNN, then flash_v1 and naive up to 16k
# (FlexAttention, which compiles per shape, is in the record run at 8192 only).
# Usage: OUT=<folder> bash experiments/scripts/gpu_session6_i.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=disabled PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u
B="python3 -m fatrain.bench bench=paper out_dir=$OUT name=attention_paper_h100_s6"
timeout 320 $B impls=[flash_v2,sdpa_flash,sdpa_cudnn] plot=false > $OUT/paper_a.log 2>&1; echo "paper a exit $?"; date -u
timeout 170 $B impls=[flash_v1,naive] seqlens=[512,1024,2048,4096,8192,16384] append=true > $OUT/paper_b.log 2>&1
echo "paper b exit $?"; date -u
wc -l $OUT/attention_paper_h100_s6.csv
