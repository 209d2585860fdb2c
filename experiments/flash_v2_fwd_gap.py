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
import json
import os
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flash_v2_load_probe as load_probe  # noqa: E402
from fatrain.kernels import flash_v2  # noqa: E402
from fatrain.kernels.flash_v2 import _fwd_inner, _row_sources  # noqa: E402


@triton.jit
def _core_fwd(Q, K, V, Out, LSE, stride_b, stride_n, stride_h, H, N, qk_scale,
              D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              TAIL: tl.constexpr):
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = pid_bh % H
    base = off_b * stride_b + off_h * stride_h
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < N
    K_desc, V_desc = _row_sources(K + base, V + base, N, stride_n, stride_n, D, BLOCK_N, D, True)
    q = tl.load(Q + base + offs_m[:, None] * stride_n + offs_d[None, :], mask=row_ok[:, None], other=0.0)
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
    B, N, H, D = q.shape
    bm, bn, w, s = cfg
    out = torch.empty_like(q)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    _core_fwd[(triton.cdiv(N, bm), B * H)](q, k, v, out, lse, q.stride(0), q.stride(1), q.stride(2), H, N,
                                          D ** -0.5 * 1.4426950408889634, D=D, BLOCK_M=bm, BLOCK_N=bn,
                                          CAUSAL=causal, TAIL=tail, num_warps=w, num_stages=s)
    return out


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
                b, h = 16384 // n, 2048 // d
                q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                ref = torch.nn.functional.scaled_dot_product_attention(
                    *(t.transpose(1, 2).float() for t in (q, k, v)), is_causal=causal).transpose(1, 2)
                flops = 4 * b * h * n * n * d / (2 if causal else 1)
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
                        row = dict(impl=name, d=d, n=n, causal=causal, round=rnd)
                        try:
                            err = ((fn().float() - ref).norm() / ref.norm()).item()
                            if not err < 1e-2:
                                raise RuntimeError(f"wrong output: relative error {err}")
                            ms = do_bench(fn, warmup=100, rep=300, return_mode="median")
                            row.update(ms=round(ms, 4), tflops=round(flops / ms * 1e-9, 1))
                            table.setdefault((name, d, n, causal), []).append(row["tflops"])
                        except Exception as exc:  # noqa: BLE001 - a probe: record and go on
                            row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                        print(json.dumps(row), flush=True)
    shapes = sorted({key[1:] for key in table})
    names = list(dict.fromkeys(key[0] for key in table))
    print("| impl | " + " | ".join(f"d{d} N{n} {'c' if c else 'nc'}" for d, n, c in shapes) + " |")
    print("|---|" + "---|" * len(shapes))
    for name in names:
        print(f"| {name} | " + " | ".join("/".join(str(x) for x in table.get((name, *s), [])) for s in shapes) + " |")


if __name__ == "__main__":
    main()
