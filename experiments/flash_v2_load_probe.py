"""How flash_v2's forward loads K and V, measured (issue 3: the forward's gap to Flex and cuDNN on Hopper).

    python experiments/flash_v2_load_probe.py [--seqlens 2048 8192] [--headdims 128 64]

A minimal FlashAttention-2 forward (no windows, documents or dropout; causal by a masked
diagonal step) in three load styles, each pinned to a few launch configurations and timed beside
the real flash_v2 kernel pinned to the same configuration and beside FlexAttention:

- ``ptrT``: K loaded through a transposed pointer tile (D x BLOCK_N), as flash_v2 does;
- ``ptr``:  K loaded as BLOCK_N x D and transposed in the dot, as Flex and the Triton tutorial do;
- ``tma``:  K and V through Hopper's tensor memory accelerator (per-program device-side tensor
  descriptors over the (N, D) slice of one head: zero fill past N and past D, no pointer tiles);
- ``tma_ws``: ``tma`` with the key loop warp-specialised (``tl.range(..., warp_specialize=True)``;
  not run by default: for sm_90a it compiles to the same registers and shared memory as ``tma``).

Every variant is checked against torch's SDPA (math backend, float32) before it is timed.
Prints one JSON line per measurement and a table of TFLOP/s last.
"""

import argparse
import json

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

import fatrain  # noqa: F401
from fatrain.kernels import flash_v2

CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 64, 8, 5), (128, 128, 8, 2)]


@triton.jit
def _step(acc, l_i, m_i, q, kT, v, offs_m, cols, qk_scale, MASK: tl.constexpr):
    qk = tl.dot(q, kT)
    if MASK:
        qk = tl.where(offs_m[:, None] >= cols[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _load_kT(K_head, cols, offs_d, stride_n, MODE: tl.constexpr):
    if MODE == 0:  # a (D, BLOCK_N) pointer tile, as flash_v2
        return tl.load(K_head + cols[None, :] * stride_n + offs_d[:, None])
    return tl.trans(tl.load(K_head + cols[:, None] * stride_n + offs_d[None, :]))


@triton.jit
def _query_block(Q, stride_b, stride_n, stride_h, H, N, D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """A probe program's (batch, head) offset, query rows and Q tile (causal: heaviest blocks first).
    Every probe kernel (here, flash_v2_overlap_probe.py, flash_v2_fwd_gap.py) starts with it."""
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
    q = tl.load(Q + base + offs_m[:, None] * stride_n + offs_d[None, :], mask=offs_m[:, None] < N, other=0.0)
    return base, start_m, offs_m, offs_n, offs_d, q


@triton.jit
def _probe_fwd(Q, K, V, Out, stride_b, stride_n, stride_h, H, N, qk_scale,
               D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
               MODE: tl.constexpr, WS: tl.constexpr):
    # MODE 0: ptrT, 1: ptr, 2: tma. Same strides for Q, K, V, Out: (B, N, H, D) contiguous.
    base, start_m, offs_m, offs_n, offs_d, q = _query_block(Q, stride_b, stride_n, stride_h, H, N, D, BLOCK_M,
                                                            BLOCK_N, CAUSAL)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    hi = N
    if CAUSAL:
        hi = start_m
    if MODE == 2:
        k_desc, v_desc = flash_v2._row_sources(K + base, V + base, N, stride_n, stride_n, D, BLOCK_N, D, True)
        for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=WS):
            k = k_desc.load([start_n, 0])
            v = v_desc.load([start_n, 0])
            acc, l_i, m_i = _step(acc, l_i, m_i, q, tl.trans(k), v, offs_m, start_n + offs_n, qk_scale, False)
        if CAUSAL:
            for start_n in tl.range(start_m, start_m + BLOCK_M, BLOCK_N):
                k = k_desc.load([start_n, 0])
                v = v_desc.load([start_n, 0])
                acc, l_i, m_i = _step(acc, l_i, m_i, q, tl.trans(k), v, offs_m, start_n + offs_n, qk_scale, True)
    else:
        for start_n in range(0, hi, BLOCK_N):
            cols = start_n + offs_n
            acc, l_i, m_i = _step(acc, l_i, m_i, q, _load_kT(K + base, cols, offs_d, stride_n, MODE),
                                  tl.load(V + base + cols[:, None] * stride_n + offs_d[None, :]),
                                  offs_m, cols, qk_scale, False)
        if CAUSAL:
            for start_n in range(start_m, start_m + BLOCK_M, BLOCK_N):
                cols = start_n + offs_n
                acc, l_i, m_i = _step(acc, l_i, m_i, q, _load_kT(K + base, cols, offs_d, stride_n, MODE),
                                      tl.load(V + base + cols[:, None] * stride_n + offs_d[None, :]),
                                      offs_m, cols, qk_scale, True)
    acc = acc / l_i[:, None]
    tl.store(Out + base + offs_m[:, None] * stride_n + offs_d[None, :], acc.to(Out.dtype.element_ty),
             mask=offs_m[:, None] < N)


MODES = {"ptrT": (0, False), "ptr": (1, False), "tma": (2, False), "tma_ws": (2, True)}


def launch(kernel, q, k, v, causal, cfg, *outputs, **meta):
    """Run a probe kernel (Q, K, V, Out, *outputs, strides, H, N, scale) on contiguous (B, N, H, D)
    inputs with cfg = (BLOCK_M, BLOCK_N, num_warps, num_stages); return Out."""
    B, N, H, D = q.shape
    bm, bn, w, s = cfg
    out = torch.empty_like(q)
    kernel[(triton.cdiv(N, bm), B * H)](q, k, v, out, *outputs, q.stride(0), q.stride(1), q.stride(2), H, N,
                                        D ** -0.5 * 1.4426950408889634, D=D, BLOCK_M=bm, BLOCK_N=bn,
                                        CAUSAL=causal, num_warps=w, num_stages=s, **meta)
    return out


def probe(q, k, v, causal, mode, cfg):
    m, ws = MODES[mode]
    return launch(_probe_fwd, q, k, v, causal, cfg, MODE=m, WS=ws)


def pinned_flash_v2(cfg):
    return (flash_v2._autotuned(flash_v2._fwd_kernel, flash_v2._configs(cfg)), flash_v2._LAUNCHERS["fwd"][1])


def inputs(d, n, causal):
    """bf16 q, k, v at 16k tokens and hidden 2048, SDPA's float32 output on them, and the forward's FLOPs."""
    b, h = 16384 // n, 2048 // d
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2).float() for t in (q, k, v)), is_causal=causal).transpose(1, 2)
    return q, k, v, ref, 4 * b * h * n * n * d / (2 if causal else 1)


def time_case(make_fn, ref, flops, row, rep=400):
    """fn = make_fn(), checked against ref, then timed (do_bench median) into row, printed as a JSON
    line; an error is recorded in the row, not raised. Returns the TFLOP/s, or None."""
    try:
        fn = make_fn()
        err = ((fn().float() - ref).norm() / ref.norm()).item()
        row["rel_err"] = round(err, 5)
        if not err < 1e-2:
            raise RuntimeError(f"wrong output: relative error {err}")
        ms = do_bench(fn, warmup=100, rep=rep, return_mode="median")
        row.update(ms=round(ms, 4), tflops=round(flops / ms * 1e-9, 1))
        return row["tflops"]
    except Exception as exc:  # noqa: BLE001 - a probe: record and go on
        row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
        return None
    finally:
        print(json.dumps(row), flush=True)


def print_table(table):
    """Markdown table of {(impl, d, n, causal): TFLOP/s, or a list of them}, one column per shape."""
    shapes = sorted({key[1:] for key in table})
    names = list(dict.fromkeys(key[0] for key in table))
    print("| impl | " + " | ".join(f"d{d} N{n} {'c' if c else 'nc'}" for d, n, c in shapes) + " |")
    print("|---|" + "---|" * len(shapes))
    for name in names:
        cells = [table.get((name, *s), "") for s in shapes]
        print(f"| {name} | " + " | ".join("/".join(map(str, c)) if isinstance(c, list) else str(c) for c in cells)
              + " |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqlens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--headdims", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--modes", nargs="+", default=["ptrT", "ptr", "tma"])
    args = parser.parse_args()
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention, dynamic=False)
    default = flash_v2._LAUNCHERS["fwd"]
    table = {}
    for d in args.headdims:
        for n in args.seqlens:
            for causal in (False, True):
                q, k, v, ref, flops = inputs(d, n, causal)
                cases = [(f"flash_v2 {c}", "flash_v2", c) for c in CONFIGS]
                cases += [(f"{mode} {c}", mode, c) for mode in args.modes for c in CONFIGS]
                cases += [("flash_v2 autotuned", "autotuned", None), ("flex", "flex", None)]
                mask = create_block_mask(lambda b_, h_, qi, ki: qi >= ki, None, None, n, n, device="cuda") \
                    if causal else None
                for name, kind, cfg in cases:

                    def make_fn(kind=kind, cfg=cfg):
                        if kind == "flex":
                            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
                            return lambda: flex(qt, kt, vt, block_mask=mask).transpose(1, 2)
                        if kind in ("flash_v2", "autotuned"):
                            flash_v2._LAUNCHERS["fwd"] = default if cfg is None else pinned_flash_v2(cfg)
                            return lambda: flash_v2.flash_v2_attention(q, k, v, causal=causal)
                        return lambda: probe(q, k, v, causal, kind, cfg)

                    tflops = time_case(make_fn, ref, flops, dict(impl=name, d=d, n=n, causal=causal))
                    if tflops is not None:
                        table[(name, d, n, causal)] = tflops
                    flash_v2._LAUNCHERS["fwd"] = default
    print_table(table)


if __name__ == "__main__":
    main()
