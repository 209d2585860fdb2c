#!/usr/bin/env bash
# Session 9, GPU call C (about 4 minutes on an H100): how stable the forward's autotuned pick is at
# the training shapes against every config pinned (3 fresh autotuners, 3 interleaved rounds), and
# the GPU test that pins every forward config (the new register-capped one included).
# Usage: OUT=<folder> bash experiments/scripts/gpu_session9_c.sh  (everything comes back in c.tar)
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
WORK=/tmp/fatrain_s9c; mkdir -p $WORK/res
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $WORK/res/env.txt 2>&1
cat $WORK/res/env.txt
timeout 300 python3 experiments/flash_v2_autotune_picks.py --pass fwd > $WORK/res/picks_fwd.log 2>&1
echo "picks exit $?"; cat $WORK/res/picks_fwd.log | cut -c1-400; date -u
timeout 200 python3 -m pytest -q tests/test_flash_v2.py -k "gpu and every_autotune and fwd" > $WORK/res/tests.log 2>&1
echo "tests exit $?"; tail -3 $WORK/res/tests.log; date -u
tar -C $WORK -cf $OUT/c.tar res
