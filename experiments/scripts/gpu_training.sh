#!/usr/bin/env bash
# The GPU training measurements of issues 7 and 8, in one device call (about 10 minutes on an H100).
#   1. backend ablation: GPT-2 small, bf16 eager, 32k tokens/step, 30 steps per job (trimmed sweep)
#   2. max context at batch 1 for naive and flash_v2
#   3. one-GPU torchrun runs of trainer.strategy=single|ddp|fsdp with flash_v2
# Usage: OUT=<folder> bash experiments/scripts/gpu_training.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}
mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=offline PYTHONUNBUFFERED=1
WORK=/tmp/fatrain_gpu
SWEEP=$WORK/ablate
mkdir -p $WORK
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null; date -u; } > "$OUT/env.txt" 2>&1

# 1. The ablation sweep (issue 7). flash_v1 is left out: one program per (batch, head) makes a
#    12-layer model crawl, and its kernel numbers come from fatrain-bench instead.
timeout 330 python3 -m fatrain.train -m experiment=ablate_backends \
  attention=flash_v2,sdpa_flash,sdpa_cudnn,naive data.seq_len=2048,8192,16384 \
  hydra.sweep.dir=$SWEEP > $WORK/sweep.log 2>&1
echo "sweep exit $?" >> $WORK/sweep.log
rm -rf $SWEEP/*/checkpoints
python3 -m fatrain.report $SWEEP --out $SWEEP/report > $WORK/report.log 2>&1

# 2. Max context (issue 7): memory does not depend on the kernel config, so autotuning is off.
FATRAIN_AUTOTUNE=0 timeout 150 python3 -m fatrain.max_context --backends naive,flash_v2 \
  --granularity 4096 --out $SWEEP/max_context > $WORK/max_context.log 2>&1
python3 -m fatrain.report $SWEEP --out $SWEEP/report --max-context $SWEEP/max_context/max_context.json \
  >> $WORK/report.log 2>&1

# 3. Strategies on one GPU (issue 8): tokens/s of ddp and fsdp against single.
for s in single ddp fsdp; do
  timeout 100 torchrun --standalone --nproc_per_node=1 -m fatrain.train hydra.run.dir=$WORK/strategy_$s \
    trainer.strategy=$s model=gpt2-small attention=flash_v2 trainer.precision=bf16 data.seq_len=2048 \
    trainer.tokens_per_step=32768 trainer.max_steps=30 trainer.log_every=5 trainer.eval_every=0 \
    trainer.eval_batches=2 trainer.ckpt_every=0 trainer.progress_bar=false logger.wandb.mode=disabled \
    optim.warmup_steps=5 > $WORK/strategy_$s.log 2>&1
  echo "strategy $s exit $?" >> $WORK/strategy_$s.log
  rm -rf $WORK/strategy_$s/checkpoints
done
python3 - <<'PY' > $WORK/strategies.md
import json, statistics
print("| strategy | median tokens/s (steps 10-30) | peak alloc GiB |\n|---|---|---|")
for s in ("single", "ddp", "fsdp"):
    try:
        rows = [json.loads(l) for l in open(f"/tmp/fatrain_gpu/strategy_{s}/metrics.jsonl")]
        tps = [r["perf/tokens_per_sec"] for r in rows if "perf/tokens_per_sec" in r and r["step"] > 10]
        mem = max(r.get("mem/peak_allocated_gib", 0) for r in rows)
        print(f"| {s} | {statistics.median(tps):,.0f} | {mem:.2f} |")
    except Exception as e:
        print(f"| {s} | failed: {e} | |")
PY
cat $WORK/strategies.md
cd $WORK && tar czf "$OUT/training_results.tgz" --exclude='*.pt' --exclude='wandb' . 2>/dev/null
cat $SWEEP/report/report.md 2>/dev/null | head -40
tail -5 $WORK/max_context.log
