#!/usr/bin/env bash
# Session 8, GPU call G (about 7 minutes on an H100): max_context of naive, SDPA flash and cuDNN
# (call E measured them, but its JSON did not come back), then the GPU tests of the session's new
# code paths and of flash_v2 outside its long reference matrix.
# Usage: OUT=<folder> bash experiments/scripts/gpu_session8_g.sh  (everything comes back in g.tar)
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=disabled PYTHONUNBUFFERED=1
WORK=/tmp/fatrain_s8g; mkdir -p $WORK/res
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $WORK/res/env.txt 2>&1
cat $WORK/res/env.txt
FATRAIN_AUTOTUNE=0 timeout 240 python3 -m fatrain.max_context --backends naive,sdpa_flash,sdpa_cudnn \
  --out $WORK/res/maxctx_others > $WORK/res/maxctx_others.log 2>&1
echo "max_context exit $?"; grep -E "max seq_len" $WORK/res/maxctx_others.log; date -u
FATRAIN_AUTOTUNE=0 timeout 300 python3 -m pytest -q tests/test_rope.py tests/test_cross_entropy.py tests/test_flash_v2.py \
  tests/test_train.py tests/test_model.py -k "gpu and not matches_reference and not every_autotune" \
  > $WORK/res/gpu_tests.log 2>&1
echo "gpu tests exit $?"; tail -3 $WORK/res/gpu_tests.log; date -u
tar -C $WORK -cf $OUT/g.tar res
