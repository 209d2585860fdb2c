#!/usr/bin/env bash
# The GPU kernel checks and benchmarks of issues 3, 4 and 5, in one device call (about 9 minutes).
#   1. every GPU-marked test (autotuning off: one config per kernel), three pytest processes at once,
#      while a fourth process compiles flash_v2's autotune configs into Triton's cache
#   2. fatrain-bench: flash_v2 vs SDPA flash / cuDNN (bench=targets), FlexAttention at N=8192,
#      flash_v1 and naive at 1k-16k; one CSV, then the plots and the ratio table
# Usage: OUT=<folder> bash experiments/scripts/gpu_kernels.sh
set -u
OUT=${OUT:-/tmp/fatrain_out}
mkdir -p "$OUT"
export FATRAIN_CACHE=/tmp/fatrain_cache WANDB_MODE=disabled PYTHONUNBUFFERED=1
LOGS=/tmp/fatrain_logs; mkdir -p $LOGS
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } > $LOGS/env.txt 2>&1

T="timeout 230 python3 -m pytest -q -m gpu -p no:cacheprovider"
FATRAIN_AUTOTUNE=0 $T tests/test_flash_v2.py > $LOGS/gpu_tests_flash_v2.log 2>&1 &
FATRAIN_AUTOTUNE=0 $T tests/test_flash_v1.py tests/test_features.py > $LOGS/gpu_tests_v1_features.log 2>&1 &
FATRAIN_AUTOTUNE=0 $T tests/test_bench.py tests/test_sweep.py tests/test_model.py tests/test_naive.py \
  tests/test_train.py tests/test_evaluate.py tests/test_sample.py > $LOGS/gpu_tests_rest.log 2>&1 &
# Compile every autotune config once (timings taken meanwhile are discarded; the bench re-tunes).
timeout 230 python3 - > $LOGS/prewarm.log 2>&1 <<'PY' &
import torch, fatrain
from fatrain.kernels import get_backend
attn = get_backend("flash_v2")
for d in (64, 128):
    for causal in (False, True):
        q, k, v = (torch.randn(2, 2048, 2048 // d, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        attn(q, k, v, causal=causal).sum().backward()
        torch.cuda.synchronize(); print("compiled", d, causal, flush=True)
PY
wait
for f in $LOGS/gpu_tests_*.log; do echo "== $f"; tail -n 3 $f; done

B="python3 -m fatrain.bench out_dir=$OUT name=attention_bench_h100"
timeout 200 $B bench=targets impls=[flash_v2,sdpa_flash,sdpa_cudnn] plot=false > $LOGS/bench_targets.log 2>&1
timeout 130 $B bench=targets impls=[flex] seqlens=[8192] append=true plot=false > $LOGS/bench_flex.log 2>&1
timeout 120 $B impls=[flash_v1,naive] seqlens=[1024,2048,4096,8192,16384] modes=[fwd,fwdbwd] \
  append=true > $LOGS/bench_v1_naive.log 2>&1
python3 -c "from fatrain.bench import summarize; summarize('$OUT/attention_bench_h100.csv')" > $LOGS/summary.md 2>&1
cat $LOGS/summary.md | head -60
cd $LOGS && tar czf "$OUT/kernel_logs.tgz" . 2>/dev/null
