"""Does overlapping the softmax with the P V matmul speed up flash_v2's forward? (issues 3, 7)

    python experiments/flash_v2_overlap_probe.py [--seqlens 2048 8192] [--headdims 64 128]
    TRITON_INTERPRET=0 python experiments/flash_v2_overlap_probe.py --sass   # no GPU: sm_90a SASS

At d=64 one key block's two matmuls take an H100's tensor cores about as long as its exp2s take
the special-function units (64 x 4 flops per score at ~4096 flops/clock/SM against 16 exp2 per
clock/SM), so a loop that runs them one after the other tops out near half the tensor peak; the
forward measures 0.41-0.44 of it. FlashAttention-3 (Shah et al. 2024, section 3.2) overlaps
them inside one warpgroup: issue S_j = Q K_j^T, issue acc += P_{j-1} V_{j-1}, wait for S_j only,
run the softmax of block j while the P V wgmma is in flight, then wait for it and rescale.

Variants, all the minimal TMA forward of ``flash_v2_load_probe.py`` (no windows, documents or
dropout; causal by masked diagonal blocks):

- ``tma``:  the straight loop (flash_v2's order);
- ``pipe``: the loop software-pipelined as above (P carried to the next iteration in bf16);
- ``split``: two key blocks a step, one max and one rescale for both, then exp2(S_a), P_a V_a,
  exp2(S_b), P_b V_b: the second block's exp2s are independent of the first P V wgmma.

Whether Triton keeps the P V wgmma in flight across the softmax shows in the SASS (``--sass``
compiles both for sm_90a and prints where the wgmma waits fall against the MUFU.EX2s).
Every variant is checked against SDPA (math, float32) before it is timed beside the real
flash_v2 (autotuned) and FlexAttention.
"""

import argparse
import os
import re
import subprocess
import sys

import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flash_v2_load_probe as load_probe  # noqa: E402
from fatrain.kernels.flash_v2 import _row_sources  # noqa: E402

CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2)]
# split: BLOCK_N is half the key block a step covers (two dots of BLOCK_N keys each)
SPLIT_CONFIGS = [(128, 32, 8, 3), (128, 64, 8, 3), (128, 32, 8, 2), (128, 64, 8, 2), (128, 32, 8, 4)]


@triton.jit
def _scores(q, k_desc, start_n, offs_m, offs_n, MASK: tl.constexpr):
    qk = tl.dot(q, tl.trans(k_desc.load([start_n, 0])))
    if MASK:
        qk = tl.where(offs_m[:, None] >= (start_n + offs_n)[None, :], qk, float("-inf"))
    return qk


@triton.jit
def _softmax(qk, m_i, qk_scale):
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    return p, alpha, m_new


@triton.jit
def _pipe_loop(acc, l_i, m_i, p, q, k_desc, v_desc, lo, hi, offs_m, offs_n, qk_scale,
               BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """Key blocks [lo, hi), with P of block lo - BLOCK_N pending (acc, l_i, m_i up to date
    except for its P V): issue S_j, issue acc += P_{j-1} V_{j-1}, softmax of S_j, rescale."""
    for start_n in range(lo, hi, BLOCK_N):
        qk = _scores(q, k_desc, start_n, offs_m, offs_n, MASK)
        acc = tl.dot(p, v_desc.load([start_n - BLOCK_N, 0]), acc)
        p_new, alpha, m_i = _softmax(qk, m_i, qk_scale)
        l_i = l_i * alpha + tl.sum(p_new, 1)
        acc = acc * alpha[:, None]
        p = p_new.to(q.dtype)
    return acc, l_i, m_i, p


@triton.jit
def _pipe_fwd(Q, K, V, Out, stride_b, stride_n, stride_h, H, N, qk_scale,
              D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    base, start_m, offs_m, offs_n, offs_d, q = load_probe._query_block(Q, stride_b, stride_n, stride_h, H, N, D,
                                                                       BLOCK_M, BLOCK_N, CAUSAL)
    k_desc, v_desc = _row_sources(K + base, V + base, N, stride_n, stride_n, D, BLOCK_N, D, True)
    hi = N
    if CAUSAL:
        hi = start_m
    # prologue: the first key block's scores and softmax (nothing to rescale yet)
    qk = _scores(q, k_desc, 0, offs_m, offs_n, CAUSAL)  # causal: block 0 may hold the diagonal
    m_i = tl.max(qk, 1) * qk_scale
    p32 = tl.math.exp2(qk * qk_scale - m_i[:, None])
    l_i = tl.sum(p32, 1)
    p = p32.to(q.dtype)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    acc, l_i, m_i, p = _pipe_loop(acc, l_i, m_i, p, q, k_desc, v_desc, BLOCK_N, hi, offs_m, offs_n, qk_scale,
                                  BLOCK_N, False)
    last = hi - BLOCK_N
    if CAUSAL:
        lo = tl.maximum(start_m, BLOCK_N)
        acc, l_i, m_i, p = _pipe_loop(acc, l_i, m_i, p, q, k_desc, v_desc, lo, start_m + BLOCK_M, offs_m, offs_n,
                                      qk_scale, BLOCK_N, True)
        last = start_m + BLOCK_M - BLOCK_N
    # epilogue: the last block's P V
    acc = tl.dot(p, v_desc.load([last, 0]), acc)
    acc = acc / l_i[:, None]
    tl.store(Out + base + offs_m[:, None] * stride_n + offs_d[None, :], acc.to(Out.dtype.element_ty),
             mask=offs_m[:, None] < N)


@triton.jit
def _split_loop(acc, l_i, m_i, q, k_desc, v_desc, lo, hi, offs_m, offs_n, qk_scale,
                BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """Key blocks [lo, hi) two at a time: both scores, one max and one rescale, then
    exp2(S_a), issue P_a V_a, exp2(S_b) (free to run while that wgmma is in flight), P_b V_b."""
    for start_n in range(lo, hi, 2 * BLOCK_N):
        qk_a = _scores(q, k_desc, start_n, offs_m, offs_n, MASK)
        qk_b = _scores(q, k_desc, start_n + BLOCK_N, offs_m, offs_n, MASK)
        m_new = tl.maximum(m_i, tl.maximum(tl.max(qk_a, 1), tl.max(qk_b, 1)) * qk_scale)
        alpha = tl.math.exp2(m_i - m_new)
        acc = acc * alpha[:, None]
        p_a = tl.math.exp2(qk_a * qk_scale - m_new[:, None])
        acc = tl.dot(p_a.to(q.dtype), v_desc.load([start_n, 0]), acc)
        p_b = tl.math.exp2(qk_b * qk_scale - m_new[:, None])
        acc = tl.dot(p_b.to(q.dtype), v_desc.load([start_n + BLOCK_N, 0]), acc)
        l_i = l_i * alpha + tl.sum(p_a, 1) + tl.sum(p_b, 1)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _split_fwd(Q, K, V, Out, stride_b, stride_n, stride_h, H, N, qk_scale,
               D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    base, start_m, offs_m, offs_n, offs_d, q = load_probe._query_block(Q, stride_b, stride_n, stride_h, H, N, D,
                                                                       BLOCK_M, BLOCK_N, CAUSAL)
    k_desc, v_desc = _row_sources(K + base, V + base, N, stride_n, stride_n, D, BLOCK_N, D, True)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    hi = N
    if CAUSAL:
        hi = start_m
    acc, l_i, m_i = _split_loop(acc, l_i, m_i, q, k_desc, v_desc, 0, hi, offs_m, offs_n, qk_scale, BLOCK_N, False)
    if CAUSAL:
        acc, l_i, m_i = _split_loop(acc, l_i, m_i, q, k_desc, v_desc, start_m, start_m + BLOCK_M, offs_m, offs_n,
                                    qk_scale, BLOCK_N, True)
    acc = acc / l_i[:, None]
    tl.store(Out + base + offs_m[:, None] * stride_n + offs_d[None, :], acc.to(Out.dtype.element_ty),
             mask=offs_m[:, None] < N)


def split(q, k, v, causal, cfg):
    assert q.shape[1] % cfg[0] == 0 and cfg[0] % (2 * cfg[1]) == 0, "the probe handles whole block pairs only"
    return load_probe.launch(_split_fwd, q, k, v, causal, cfg)


def pipe(q, k, v, causal, cfg):
    assert q.shape[1] % cfg[0] == 0 and cfg[0] % cfg[1] == 0, "the probe handles whole blocks only"
    return load_probe.launch(_pipe_fwd, q, k, v, causal, cfg)


def sass(d: int, cfg, causal: bool) -> None:
    """Compile both variants for sm_90a and print the order of wgmma issues, waits and exp2s."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    bm, bn, w, s = cfg
    sig = dict(Q="*bf16", K="*bf16", V="*bf16", Out="*bf16", stride_b="i32", stride_n="i32", stride_h="i32",
               H="i32", N="i32", qk_scale="fp32")
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(7)}
    variants = {"tma": (load_probe._probe_fwd, dict(MODE=2, WS=False)), "pipe": (_pipe_fwd, {}),
                "split": (_split_fwd, {})}
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name, (fn, extra) in variants.items():
        constexprs = dict(D=d, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, **extra)
        src = ASTSource(fn, dict(sig, **{k: "constexpr" for k in constexprs}), constexprs=constexprs, attrs=attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=w, num_stages=s))
        with open("/tmp/_overlap.cubin", "wb") as f:
            f.write(kernel.asm["cubin"])
        text = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", "/tmp/_overlap.cubin"],
                              capture_output=True, text=True).stdout
        ptx = kernel.asm["ptx"]
        usage = subprocess.run([os.path.join(bindir, "cuobjdump"), "-res-usage", "/tmp/_overlap.cubin"],
                               capture_output=True, text=True).stdout
        regs = re.search(r"REG:(\d+)", usage)
        events = []
        for line in text.splitlines():
            m = re.search(r"(HGMMA\S*|WARPGROUP\.\S+[^;]*|MUFU\.EX2|BRA\b[^;]*|BAR\.\S+|SYNCS\.\S+)", line)
            if m:
                tag = m.group(1).split()[0] if m.group(1).startswith("HGMMA") else m.group(1)
                if events and events[-1][0] == tag:
                    events[-1][1] += 1
                else:
                    events.append([tag, 1])
        print(f"== {name} d={d} {bm}x{bn} w{w} s{s} causal={causal}: regs={regs.group(1) if regs else '?'} "
              f"shared={kernel.metadata.shared} "
              f"wgmma.wait_group in ptx: {len(re.findall('wgmma.wait_group', ptx))}")
        print("   " + " ".join(f"{tag}x{n}" if n > 1 else tag for tag, n in events))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqlens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--headdims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--sass", action="store_true", help="compile for sm_90a and print the SASS order")
    args = parser.parse_args()
    if args.sass:
        for d in args.headdims:
            for cfg in CONFIGS[:2]:
                sass(d, cfg, causal=False)
        return
    import torch
    from fatrain.kernels import flash_v2
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    flex = torch.compile(flex_attention, dynamic=False)
    table = {}
    for d in args.headdims:
        for n in args.seqlens:
            for causal in (False, True):
                q, k, v, ref, flops = load_probe.inputs(d, n, causal)
                mask = create_block_mask(lambda b_, h_, qi, ki: qi >= ki, None, None, n, n, device="cuda") \
                    if causal else None
                qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
                runs = {"tma": lambda cfg: load_probe.probe(q, k, v, causal, "tma", cfg),
                        "pipe": lambda cfg: pipe(q, k, v, causal, cfg),
                        "split": lambda cfg: split(q, k, v, causal, cfg),
                        "flash_v2": lambda cfg: flash_v2.flash_v2_attention(q, k, v, causal=causal),
                        "flex": lambda cfg: flex(qt, kt, vt, block_mask=mask).transpose(1, 2)}
                cases = [(f"{mode} {c}", mode, c) for c in CONFIGS for mode in ("tma", "pipe")]
                cases += [(f"split {c}", "split", c) for c in SPLIT_CONFIGS]
                cases += [("flash_v2", "flash_v2", None), ("flex", "flex", None)]
                for name, kind, cfg in cases:
                    tflops = load_probe.time_case(lambda kind=kind, cfg=cfg: lambda: runs[kind](cfg), ref, flops,
                                                  dict(impl=name, d=d, n=n, causal=causal), rep=300)
                    if tflops is not None:
                        table[(name, d, n, causal)] = tflops
    load_probe.print_table(table)


if __name__ == "__main__":
    main()
