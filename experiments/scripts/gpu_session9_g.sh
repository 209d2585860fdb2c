#!/usr/bin/env bash
# Session 9, GPU call G (about 8 minutes on an H100): the refining autotuner (top three configs
# re-timed in interleaved rounds): flash_v2's GPU tests (torch.compile, CUDA graphs, atomic dQ, the
# autotuner test on the GPU), the dK/dV pass's picks at the training shapes, then issue 7's training
# comparison at 8k and 16k twice (two sweeps, the second with cuDNN first), with each flash_v2 job's
# autotune picks in its result.json.
# Usage: OUT=<folder> bash experiments/scripts/gpu_session9_g.sh  (everything comes back in g.tar)
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=offline PYTHONUNBUFFERED=1
WORK=/tmp/fatrain_s9g; mkdir -p $WORK/res
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $WORK/res/env.txt 2>&1
cat $WORK/res/env.txt
timeout 200 python3 -m pytest -q tests/test_flash_v2.py tests/test_rope.py \
  -k "autotuner or (gpu and compile) or (gpu and atomic and not every_autotune)" > $WORK/res/tests.log 2>&1
echo "tests exit $?"; tail -3 $WORK/res/tests.log; date -u
timeout 150 python3 experiments/flash_v2_autotune_picks.py --pass dkdv --rounds 1 > $WORK/res/picks_dkdv.log 2>&1
echo "picks exit $?"; grep "autotune\|refined\|^dkdv" $WORK/res/picks_dkdv.log | cut -c1-200; date -u
for order in a b; do
  if [ $order = a ]; then backends=flash_v2,sdpa_flash,sdpa_cudnn; else backends=sdpa_cudnn,flash_v2; fi
  SWEEP=$WORK/ablate_$order
  timeout 200 python3 -m fatrain.train -m experiment=ablate_backends hydra.sweep.dir=$SWEEP \
    attention=$backends data.seq_len=8192,16384 > $WORK/res/sweep_$order.log 2>&1
  echo "sweep $order exit $?"; date -u
  rm -rf $SWEEP/*/checkpoints $SWEEP/*/wandb
  python3 -m fatrain.report $SWEEP --out $WORK/res/report_$order > /dev/null 2>&1; echo "report exit $?"
  python3 - <<PY
import csv, glob, json
rows = list(csv.DictReader(open("$WORK/res/report_$order/report.csv")))
tps = {(r["backend"], r["seq_len"]): float(r["tokens_per_sec"] or 0) for r in rows}
for r in rows:
    print(r["backend"], r["seq_len"], r["status"], round(float(r["tokens_per_sec"] or 0)), r["peak_requested_gib"],
          r["final_val_loss"])
for n in ("8192", "16384"):
    v2 = tps.get(("flash_v2", n), 0)
    print(n, "flash_v2 / sdpa_flash", round(v2 / max(tps.get(("sdpa_flash", n), 1), 1), 3),
          "flash_v2 / sdpa_cudnn", round(v2 / max(tps.get(("sdpa_cudnn", n), 1), 1), 3))
for path in sorted(glob.glob("$SWEEP/*flash_v2*/result.json")):
    for row in json.load(open(path)).get("flash_v2_autotune", []):
        print(path.split("/")[-2], row["kernel"], row["key"][:2], row["config"])
PY
done
tar -C $WORK -cf $OUT/g.tar res ablate_a ablate_b
date -u
