#!/usr/bin/env bash
# Session 9, GPU call D (about 7 minutes on an H100): the forward's autotune picks again with the
# register-capped config second in the list, then issue 7's training comparison at the two target
# lengths (flash_v2, SDPA flash, SDPA cuDNN; experiment=ablate_backends), jobs and report.
# Usage: OUT=<folder> bash experiments/scripts/gpu_session9_d.sh  (everything comes back in d.tar)
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=offline PYTHONUNBUFFERED=1
WORK=/tmp/fatrain_s9d; mkdir -p $WORK/res
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $WORK/res/env.txt 2>&1
cat $WORK/res/env.txt
timeout 150 python3 experiments/flash_v2_autotune_picks.py --pass fwd --rounds 1 > $WORK/res/picks_fwd.log 2>&1
echo "picks exit $?"; grep "autotune\|^fwd" $WORK/res/picks_fwd.log | cut -c1-120; date -u
SWEEP=$WORK/ablate
timeout 400 python3 -m fatrain.train -m experiment=ablate_backends hydra.sweep.dir=$SWEEP \
  attention=flash_v2,sdpa_flash,sdpa_cudnn data.seq_len=8192,16384 > $WORK/res/sweep.log 2>&1
echo "sweep exit $?"; tail -3 $WORK/res/sweep.log; date -u
rm -rf $SWEEP/*/checkpoints $SWEEP/*/wandb
python3 -m fatrain.report $SWEEP --out $WORK/res/report > $WORK/res/report.log 2>&1; echo "report exit $?"
python3 - <<PY
import csv
rows = list(csv.DictReader(open("$WORK/res/report/report.csv")))
tps = {(r["backend"], r["seq_len"]): float(r["tokens_per_sec"] or 0) for r in rows}
for r in rows:
    print(r["backend"], r["seq_len"], r["status"], round(float(r["tokens_per_sec"] or 0)), r["peak_allocated_gib"],
          r["peak_requested_gib"], r["final_val_loss"])
for n in ("8192", "16384"):
    v2 = tps.get(("flash_v2", n), 0)
    print(n, "flash_v2 / sdpa_flash", round(v2 / max(tps.get(("sdpa_flash", n), 1), 1), 3),
          "flash_v2 / sdpa_cudnn", round(v2 / max(tps.get(("sdpa_cudnn", n), 1), 1), 3))
PY
tar -C $WORK -cf $OUT/d.tar res ablate
date -u
