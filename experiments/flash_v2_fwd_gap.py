"""Why is flash_v2's forward slower than a minimal kernel with the same inner loop? (issues 3, 7)

    python experiments/flash_v2_fwd_gap.py [--seqlens 2048 8192] [--headdims 64 128]

The overlap probe (session 6 call A) timed the minimal TMA forward of
``flash_v2_load_probe.py`` at 421-433 TFLOP/s (d=64) and 489-539 (d=128) where flash_v2,
autotuned, ran 370-402 and 446-491, although the two compile to the same inner loop (sm_90a
SASS: 300 vs 293 instructions, the same HGMMA / MUFU / barrier sequence). This times, non-causal
and causal, bf16, 16k tokens, hidden 2048:

- ``probe``: the minimal forward (``flash_v2_load_probe._probe_fwd``, TMA);
- ``core``: flash_v2's own ``_fwd_inner`` over the whole-block key range, then flash_v2's
  epilogue (O and LSE); ``core+tail`` adds the masked Nk-tail loop flash_v2 always has;
- ``flash_v2 fixed``: the real kernel with the same tiles (block_m, block_n) and 8 warps, 3 stages;
- ``flash_v2``: the real kernel, autotuned.
"""

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flash_v2_load_probe as load_probe  # noqa: E402
from fatrain.kernels import flash_v2  # noqa: E402
from fatrain.kernels.flash_v2 import _fwd_inner, _row_sources  # noqa: E402


@triton.jit
def _core_fwd(Q, K, V, Out, LSE, stride_b, stride_n, stride_h, H, N, qk_scale,
              D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              TAIL: tl.constexpr):
    base, start_m, offs_m, offs_n, offs_d, q = load_probe._query_block(Q, stride_b, stride_n, stride_h, H, N, D,
                                                                       BLOCK_M, BLOCK_N, CAUSAL)
    pid_bh = tl.program_id(1)
    row_ok = offs_m < N
    K_desc, V_desc = _row_sources(K + base, V + base, N, stride_n, stride_n, D, BLOCK_N, D, True)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    hi = N
    full_hi = N
    if CAUSAL:
        hi = tl.minimum(N, start_m + BLOCK_M)
        full_hi = tl.minimum(N, start_m + 1)
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K + base, V + base, K_desc, V_desc, stride_n, 1, stride_n, 1,
                               Q, 0, 0, 0, 0, offs_m, offs_n, offs_d, 0, full_hi, N, 0, 0, 0, qk_scale, 0, 0.0,
                               pid_bh, N, D, D, BLOCK_N, False, False, CAUSAL, False, "tf32", False, True)
    if TAIL or CAUSAL:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K + base, V + base, K_desc, V_desc, stride_n, 1, stride_n, 1,
                                   Q, 0, 0, 0, 0, offs_m, offs_n, offs_d, full_hi, hi, N, 0, 0, 0, qk_scale, 0,
                                   0.0, pid_bh, N, D, D, BLOCK_N, True, False, CAUSAL, False, "tf32", False, True)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, 0.0, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(LSE + pid_bh.to(tl.int64) * N + offs_m, lse, mask=row_ok)
    tl.store(Out + base + offs_m[:, None] * stride_n + offs_d[None, :], acc.to(Out.dtype.element_ty),
             mask=row_ok[:, None])


def core(q, k, v, causal, cfg, tail):
    B, N, H, _ = q.shape
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    return load_probe.launch(_core_fwd, q, k, v, causal, cfg, lse, TAIL=tail)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqlens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--headdims", type=int, nargs="+", default=[64, 128])
    args = parser.parse_args()
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    table = {}
    for d in args.headdims:
        cfgs = [(128, 64, 8, 3)] if d == 64 else [(128, 64, 8, 3), (128, 128, 8, 3)]
        for n in args.seqlens:
            for causal in (False, True):
                q, k, v, ref, flops = load_probe.inputs(d, n, causal)
                cases = []
                for c in cfgs:
                    cases += [(f"probe {c}", lambda c=c: load_probe.probe(q, k, v, causal, "tma", c)),
                              (f"core {c}", lambda c=c: core(q, k, v, causal, c, False)),
                              (f"core+tail {c}", lambda c=c: core(q, k, v, causal, c, True)),
                              (f"flash_v2 fixed {c}", lambda c=c: flash_v2.flash_v2_attention(
                                  q, k, v, causal=causal, block_m=c[0], block_n=c[1]))]
                cases.append(("flash_v2", lambda: flash_v2.flash_v2_attention(q, k, v, causal=causal)))
                for rnd in range(2):  # two rounds, interleaved: the median of each, both kept
                    for name, fn in cases:
                        tflops = load_probe.time_case(lambda fn=fn: fn, ref, flops,
                                                      dict(impl=name, d=d, n=n, causal=causal, round=rnd), rep=300)
                        if tflops is not None:
                            table.setdefault((name, d, n, causal), []).append(tflops)
    load_probe.print_table(table)


if __name__ == "__main__":
    main()
