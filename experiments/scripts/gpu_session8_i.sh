#!/usr/bin/env bash
# Session 8, GPU call I (about 5 minutes on an H100): the fused RoPE and loss kernels as torch.library
# ops under torch.compile: GPU tests (bf16/fp16 kernels, the compiled model against the PyTorch ops),
# then training with trainer.compile=true at 8k for flash_v2 and sdpa_flash (call H had PyTorch's ops
# under compile).
# Usage: OUT=<folder> bash experiments/scripts/gpu_session8_i.sh  (everything comes back in i.tar)
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=offline PYTHONUNBUFFERED=1
WORK=/tmp/fatrain_s8i; mkdir -p $WORK/res
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $WORK/res/env.txt 2>&1
cat $WORK/res/env.txt
timeout 150 python3 -m pytest -q tests/test_rope.py tests/test_cross_entropy.py -k gpu > $WORK/res/tests.log 2>&1
echo "tests exit $?"; tail -2 $WORK/res/tests.log; date -u
timeout 280 python3 -m fatrain.train -m experiment=ablate_backends hydra.sweep.dir=$WORK/compiled \
  attention=flash_v2,sdpa_flash data.seq_len=8192 trainer.compile=true > $WORK/res/compiled.log 2>&1
echo "compiled sweep exit $?"; tail -2 $WORK/res/compiled.log; date -u
rm -rf $WORK/compiled/*/checkpoints $WORK/compiled/*/wandb
python3 -m fatrain.report $WORK/compiled --out $WORK/res/report_compiled > /dev/null 2>&1; echo "report exit $?"
python3 - <<PY
import csv
for r in csv.DictReader(open("$WORK/res/report_compiled/report.csv")):
    print(r["backend"], r["seq_len"], r["status"], round(float(r["tokens_per_sec"] or 0)), r["peak_requested_gib"], r["final_val_loss"])
PY
tar -C $WORK -cf $OUT/i.tar res compiled
