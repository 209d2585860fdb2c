#!/usr/bin/env bash
# Session 2, GPU call C (about 7 minutes on an H100):
#   1. dropout generators A/B in flash_v2 (Philox per 8 columns vs pcg3d per element), p = 0 / 0.1,
#      causal d=128 N=16384, forward and forward+backward, each kernel's first (default) config
#   2. the GPU tests of flash_v2 and the features with the pcg generator (and the reordered defaults)
#   3. one-GPU torchrun runs of trainer.strategy=single|ddp|fsdp with flash_v2 (issue 8)
# Usage: OUT=<folder> bash experiments/scripts/gpu_session2_c.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=disabled PYTHONUNBUFFERED=1 FATRAIN_AUTOTUNE=0
for rng in philox pcg; do
  FATRAIN_DROPOUT_RNG=$rng timeout 80 python3 -m fatrain.bench bench=features impls=[flash_v2] windows=[-1] \
    doc_lens=[0] dropout_ps=[0.0,0.1] seqlens=[16384] out_dir=$OUT name=dropout_$rng plot=false \
    > $OUT/dropout_$rng.log 2>&1
  echo "$rng exit $?"; cut -d, -f1-5,9,10,15 $OUT/dropout_$rng.csv
done
FATRAIN_DROPOUT_RNG=pcg timeout 190 python3 -m pytest -q -m gpu -p no:cacheprovider -n 12 -rfE \
  tests/test_features.py tests/test_flash_v2.py > $OUT/gpu_tests_c.log 2>&1
echo "tests exit $?"; grep -E "passed|failed|FAILED|ERROR" $OUT/gpu_tests_c.log | tail -15
WORK=/tmp/fatrain_strategies; mkdir -p $WORK
for s in single ddp fsdp; do
  timeout 75 python3 -m torch.distributed.run --standalone --nproc_per_node=1 -m fatrain.train \
    hydra.run.dir=$WORK/$s trainer.strategy=$s model=gpt2-small attention=flash_v2 trainer.precision=bf16 \
    data.seq_len=2048 trainer.tokens_per_step=32768 trainer.max_steps=25 trainer.log_every=5 \
    trainer.eval_every=0 trainer.eval_batches=2 trainer.ckpt_every=0 trainer.save_final=false \
    trainer.progress_bar=false logger.wandb.mode=disabled optim.warmup_steps=5 > $OUT/strategy_$s.log 2>&1
  echo "strategy $s exit $?"
done
python3 - <<'PY' | tee $OUT/strategies.md
import json, statistics
print("| strategy | median tokens/s (steps 10-25) | vs single | peak alloc GiB |\n|---|---:|---:|---:|")
base = None
for s in ("single", "ddp", "fsdp"):
    try:
        rows = [json.loads(l) for l in open(f"/tmp/fatrain_strategies/{s}/metrics.jsonl")]
    except OSError as err:
        print(f"| {s} | missing ({err}) | | |"); continue
    tps = [r["perf/tokens_per_sec"] for r in rows if "perf/tokens_per_sec" in r and r["step"] >= 10]
    mem = max(r.get("mem/peak_allocated_gib", 0) for r in rows)
    med = statistics.median(tps) if tps else float("nan")
    base = base or med
    print(f"| {s} | {med:,.0f} | {med / base:.3f} | {mem:.2f} |")
PY
