#!/usr/bin/env bash
# Second GPU training call (after the sweep memory fix): peak memory per backend, max context,
# FSDP on one GPU, and the issue-5 feature benchmark. About 7 minutes on an H100.
# Usage: OUT=<folder> bash experiments/scripts/gpu_followup.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}
mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=offline PYTHONUNBUFFERED=1
WORK=/tmp/fatrain_gpu2; SWEEP=$WORK/ablate; mkdir -p $WORK

# 1. Backends at 8k and 16k (GPT-2 small, bf16, 32k tokens/step); naive also at 1k, where it fits.
timeout 200 python3 -m fatrain.train -m experiment=ablate_backends hydra.sweep.dir=$SWEEP \
  attention=flash_v2,sdpa_flash,sdpa_cudnn,naive data.seq_len=8192,16384 > $WORK/sweep.log 2>&1
timeout 60 python3 -m fatrain.train -m experiment=ablate_backends hydra.sweep.dir=$SWEEP \
  attention=naive,flash_v2 data.seq_len=1024 >> $WORK/sweep.log 2>&1
rm -rf $SWEEP/*/checkpoints

# 2. Max context at batch 1 (memory does not depend on the kernel config: autotuning off).
FATRAIN_AUTOTUNE=0 timeout 120 python3 -m fatrain.max_context --backends naive,flash_v2 \
  --start 4096 --granularity 4096 --limit 131072 --out $SWEEP > $WORK/max_context.log 2>&1
python3 -m fatrain.report $SWEEP --out $SWEEP/report > $WORK/report.log 2>&1

# 3. FSDP vs single on one GPU (issue 8's 5% check), after the bf16 mixed-precision policy.
for s in single fsdp; do
  timeout 90 torchrun --standalone --nproc_per_node=1 -m fatrain.train hydra.run.dir=$WORK/strategy_$s \
    trainer.strategy=$s model=gpt2-small attention=flash_v2 trainer.precision=bf16 data.seq_len=2048 \
    trainer.tokens_per_step=32768 trainer.max_steps=30 trainer.log_every=5 trainer.eval_every=0 \
    trainer.eval_batches=2 trainer.ckpt_every=0 trainer.progress_bar=false logger.wandb.mode=disabled \
    optim.warmup_steps=5 > $WORK/strategy_$s.log 2>&1
  echo "strategy $s exit $?" >> $WORK/strategy_$s.log; rm -rf $WORK/strategy_$s/checkpoints
done

# 4. Issue 5's features: windows, packed documents, dropout against plain causal.
timeout 120 python3 -m fatrain.bench bench=features impls=[flash_v2] out_dir=$OUT name=attention_features_h100 \
  > $WORK/features.log 2>&1
timeout 60 python3 -m fatrain.bench bench=features impls=[flash_v1] seqlens=[16384] append=true \
  out_dir=$OUT name=attention_features_h100 >> $WORK/features.log 2>&1
python3 -c "from fatrain.bench import summarize_features; summarize_features('$OUT/attention_features_h100.csv')" \
  > $WORK/features_summary.md 2>&1

cd $WORK && tar czf "$OUT/followup_results.tgz" --exclude='*.pt' --exclude='wandb' . 2>/dev/null
sed -n 1,60p $SWEEP/report/report.md; cat $WORK/features_summary.md | head -30; tail -3 $WORK/max_context.log
grep -h "tokens_per_sec" $WORK/strategy_*/metrics.jsonl | tail -2
