#!/usr/bin/env bash
# Session 3, GPU call B (about 7 minutes on an H100): the issue-7 training sweep again, now with
# valid peak memory (per-job reset of the CUDA peak counter, previous job freed), then fatrain-report.
#   GPT-2 small, bf16 eager, 32k tokens/step, 30 steps; flash_v2, SDPA flash, cuDNN, naive x 2k/8k/16k
# Usage: OUT=<folder> bash experiments/scripts/gpu_session3_b.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=offline PYTHONUNBUFFERED=1
WORK=/tmp/fatrain_s3; SWEEP=$WORK/ablate; mkdir -p $WORK
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $OUT/env.txt 2>&1
timeout 400 python3 -m fatrain.train -m experiment=ablate_backends hydra.sweep.dir=$SWEEP \
  attention=flash_v2,sdpa_flash,sdpa_cudnn,naive data.seq_len=2048,8192,16384 > $WORK/sweep.log 2>&1
echo "sweep exit $?"
rm -rf $SWEEP/*/checkpoints
python3 -m fatrain.report $SWEEP --out $OUT/report > $OUT/report.log 2>&1; echo "report exit $?"
for d in $SWEEP/*/; do mkdir -p $OUT/jobs/$(basename $d); cp $d/metrics.jsonl $d/result.json $d/.hydra/overrides.yaml \
  $OUT/jobs/$(basename $d)/ 2>/dev/null; done
tail -5 $WORK/sweep.log > $OUT/sweep_tail.log
cat $OUT/report/report.md | head -40
