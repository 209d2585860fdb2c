#!/usr/bin/env bash
# Session 3, GPU call E (about 6 minutes on an H100): flash_v2 with deterministic=False (dQ added
# with atomics inside the dK/dV pass, 5 backward matmuls instead of 7)
#   1. its GPU tests (bf16 against the reference, dropout, torch.compile) and the bench GPU test
#   2. fwd+bwd kernel timings beside the deterministic flash_v2, SDPA flash and cuDNN (issues 3, 7)
#   3. training: GPT-2 small at 8k and 16k with attention.deterministic=false beside SDPA flash / cuDNN (issue 7)
# Usage: FATRAIN_GIT_SHA=<commit> OUT=<folder> bash experiments/scripts/gpu_session3_e.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}; mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=offline PYTHONUNBUFFERED=1
FATRAIN_AUTOTUNE=0 timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -n 8 -rfE \
  tests/test_flash_v2.py -k "atomic" tests/test_bench.py > $OUT/gpu_tests.log 2>&1
echo "tests exit $?"; grep -E "passed|failed|FAILED|ERROR" $OUT/gpu_tests.log | tail -8
timeout 200 python3 -m fatrain.bench bench=targets impls=[flash_v2_atomic,flash_v2,sdpa_flash,sdpa_cudnn] \
  modes=[bwd,fwdbwd] seqlens=[2048,8192,16384] out_dir=$OUT name=atomic_h100 plot=false > $OUT/atomic_bench.log 2>&1
echo "bench exit $?"
python3 -c "from fatrain.bench import summarize; summarize('$OUT/atomic_h100.csv', numerator='flash_v2_atomic', denominators=('flash_v2', 'sdpa_flash', 'sdpa_cudnn'))" 2>&1 | tail -28
WORK=/tmp/fatrain_s3e; SWEEP=$WORK/ablate; mkdir -p $WORK
# Two sweeps into one folder (attention.deterministic is a flash_v2 setting; the job folders differ by name).
timeout 100 python3 -m fatrain.train -m experiment=ablate_backends hydra.sweep.dir=$SWEEP \
  attention=flash_v2 attention.deterministic=false data.seq_len=8192,16384 > $WORK/sweep1.log 2>&1
echo "sweep 1 exit $?"; tail -2 $WORK/sweep1.log
timeout 150 python3 -m fatrain.train -m experiment=ablate_backends hydra.sweep.dir=$SWEEP \
  attention=flash_v2,sdpa_flash,sdpa_cudnn data.seq_len=8192,16384 > $WORK/sweep2.log 2>&1
echo "sweep 2 exit $?"; tail -2 $WORK/sweep2.log
python3 -m fatrain.report $SWEEP --out $OUT/report > $OUT/report.log 2>&1; echo "report exit $?"
sed -n 1,16p $OUT/report/report.md
