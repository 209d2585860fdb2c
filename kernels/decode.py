"""Flash-decoding: a few queries against a long KV cache, the key range split across programs.

With one query per sequence the forward of flash_v2 has batch x nheads programs, each of
which walks the whole cache alone: a batch of 1 at 128k cached keys keeps a handful of SMs
busy and the rest idle. Flash-decoding (Dao, Haziza, Massa, Sizov 2023, "Flash-Decoding for
long-context inference"; flash-attn's ``num_splits``) splits the key range instead:

  1. Split pass, grid (num_splits, batch * nheads_k, cdiv(group * Nq, BLOCK_M)). Program
     (s, b, h_kv) owns the s-th chunk of the keys sequence b's queries can see, and every
     query head of the GQA group of h_kv: the M dimension holds the (query, head) pairs
         m = i * group + g      ->  query row i, query head h_kv * group + g
     so each K/V tile is read once for the whole group (no copy of K or V, no re-read per
     head). Online softmax in base 2 over the chunk, as flash_v2's forward:
         S = Q K_j^T * scale * log2(e)      m_new = max(m, rowmax(S))
         P = exp2(S - m_new)                l = l exp2(m - m_new) + rowsum(P)
         acc = acc exp2(m - m_new) + P V_j
     It writes the chunk's normalised output O_s = acc / l and its base-2 logsumexp
     lse_s = m + log2(l) (-inf for a chunk with no visible key) to float32 scratch:
     O_part (num_splits, B, H, Nq, D), LSE_part (num_splits, B, H, Nq).
  2. Combine pass, grid (Nq, B * H): one program per output row merges the splits by their
     logsumexp, with no atomics:
         M = max_s lse_s     w_s = exp2(lse_s - M)     O = sum_s w_s O_s / sum_s w_s
         LSE = (M + log2(sum_s w_s)) ln 2
Per-sequence lengths: sequence b's cache holds ``cache_seqlens[b]`` valid keys (the rest of
the (B, Nk_max, Hkv, D) buffer is never read); its query i sits at key position
i + cache_seqlens[b] - Nq (bottom-right, flash-attn's rule), and causal / window_size are
applied from there. Each program first narrows its chunk to the keys some row of its block
can see, so a window of 4k keys over a 128k cache costs 4k keys, split across programs too.

num_splits=0 picks the split count from the SM count, the programs the other axes already
give and the power-of-two bucket of Nk_max, so one bucket gives one split count and one
autotuner key. The split kernel is tuned per shape class (``_autotune.shape_class_autotuned``:
the decode class of Nq and the power-of-two bucket of the cache's Nk, with the split count,
BLOCK_M, the head dim and the mask flags exact), its picks kept in the cache folder, so decoding
token after token into a preallocated cache tunes once, and a second process not at all.

Variants (flash_v2's): ALiBi and the soft-cap change S in the split pass (one slope per
(query, head) row); a sink logit joins the merge once, as one more split with no value:
    M = max(M, sink)     O = sum_s w_s O_s / (sum_s w_s + exp2(sink - M))

Caution / known limits: forward only (inference; no autograd). cache_seqlens values are not
read on the host (no device sync): values above Nk_max are clipped to Nk_max, negative ones
count as 0. Nq is meant to be small (decoding, speculative steps, short chunks); a long Nq
runs, one M block of up to 64 (query, head) pairs per program, but flash_v2 is the faster
kernel there. Float32 scratch of num_splits x B x H x Nq x D floats per call.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._autotune import picks, shape_class_autotuned, short_bench
from ._common import (MASKED_ROW_LSE, check_alibi_slopes, check_qkv, check_sink_logits, check_softcap,
                      check_triton_device, default_scale, normalize_window, register_op)
from .flash_v2 import _tanh, _variant_args

BACKEND = "flash_decode"
HEAD_DIMS = (16, 256)
LOG2E = 1.4426950408889634  # 1 / ln(2)
LN2 = 0.6931471805599453
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: Most splits of one sequence's key range, and the fewest keys a split gets from the heuristic.
MAX_SPLITS = 128
MIN_KEYS_PER_SPLIT = 256
#: The M block (query, head) pairs per program: at least 16 (tl.dot), at most 64 (32 above
#: headdim 128, where 64 rows of Q and three stages of 64-key K/V tiles pass 228 KB of shared memory).
MAX_BLOCK_M = 64


# ----------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------

@triton.jit
def _decode_split_kernel(Q, K, V, SEQLENS, O_part, LSE_part,
                         stride_qb, stride_qm, stride_qh, stride_qd,
                         stride_kb, stride_kn, stride_kh, stride_kd,
                         stride_vb, stride_vn, stride_vh, stride_vd,
                         stride_ps, stride_pb, stride_ph, stride_pm, stride_pd,
                         stride_ls, stride_lb, stride_lh,
                         Hkv, GROUP, Nq, Nk, qk_scale, win_left, win_right, NUM_SPLITS,
                         SLOPES, stride_slb, stride_slh, softcap_in, softcap_out,
                         D: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_SEQLENS: tl.constexpr,
                         MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = (pid_bh // Hkv).to(tl.int64)  # b * stride_kb passes 2**31 elements at batch 32 x 128k keys
    h_kv = pid_bh % Hkv

    # -- the M dimension: (query row, query head of the group) pairs --
    rows_total = GROUP * Nq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < rows_total
    row_i = offs_m // GROUP
    head = h_kv * GROUP + offs_m % GROUP
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D

    # -- the keys this sequence holds, and the chunk of them this split owns --
    if HAS_SEQLENS:
        seqlen = tl.load(SEQLENS + b)
        seqlen = tl.minimum(tl.maximum(seqlen, 0), Nk)
    else:
        seqlen = Nk
    shift = seqlen - Nq  # query i sits at key position i + shift
    first_i = (pid_m * BLOCK_M) // GROUP
    last_i = (tl.minimum((pid_m + 1) * BLOCK_M, rows_total) - 1) // GROUP
    lo = 0
    hi = seqlen
    if MASK_LEFT:
        lo = tl.maximum(first_i + shift - win_left, 0)
    if MASK_RIGHT:
        hi = tl.minimum(last_i + shift + win_right + 1, seqlen)
    hi = tl.maximum(hi, lo)
    chunk = tl.cdiv(tl.cdiv(hi - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    end = tl.minimum(start + chunk, hi)

    q_ptrs = (Q + b * stride_qb + row_i[:, None] * stride_qm + head[:, None] * stride_qh
              + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    pos = row_i + shift
    if HAS_SOFTCAP:  # NOTE: fp64 under torch.compile, as qk_scale in flash_v2
        softcap_in = tl.cast(softcap_in, tl.float32)
        softcap_out = tl.cast(softcap_out, tl.float32)
    if HAS_ALIBI:  # each row of the block is a (query, head) pair: one slope per row, in base 2
        slope2 = tl.load(SLOPES + b * stride_slb + head * stride_slh, mask=row_ok, other=0.0) * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < end
        kT = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        # -- S_j = Q K_j^T * scale * log2(e), masked --
        if HAS_SOFTCAP:  # -- S = softcap tanh(S / softcap), in base 2 --
            s = _tanh(tl.dot(q, kT, input_precision=DOT_PRECISION) * softcap_in, FAST_TANH) * softcap_out
        else:
            s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale
        if HAS_ALIBI:  # -- S -= slope |i + seqlen - Nq - j| --
            s = s - slope2[:, None] * tl.abs(pos[:, None] - cols[None, :]).to(tl.float32)
        allowed = col_ok[None, :]
        if MASK_RIGHT:
            allowed = allowed & (cols[None, :] <= pos[:, None] + win_right)
        if MASK_LEFT:
            allowed = allowed & (cols[None, :] >= pos[:, None] - win_left)
        s = tl.where(allowed, s, float("-inf"))
        # -- online softmax; a row that has seen no key yet keeps m = -inf (exp2 of 0 offsets) --
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        # -- acc = acc * alpha + P_j V_j --
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse2 = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    part = O_part + split * stride_ps + b * stride_pb
    tl.store(part + head[:, None] * stride_ph + row_i[:, None] * stride_pm + offs_d[None, :] * stride_pd, o,
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE_part + split * stride_ls + b * stride_lb + head * stride_lh + row_i, lse2, mask=row_ok)


@triton.jit
def _decode_combine_kernel(O_part, LSE_part, Out, LSE, SINKS,
                           stride_ps, stride_pb, stride_ph, stride_pm, stride_pd,
                           stride_ls, stride_lb, stride_lh,
                           stride_ob, stride_om, stride_oh, stride_od,
                           H, Nq, NUM_SPLITS,
                           D: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED_LSE: tl.constexpr,
                           HAS_SINKS: tl.constexpr, BLOCK_S: tl.constexpr):
    i = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < NUM_SPLITS
    lse = tl.load(LSE_part + offs_s * stride_ls + b * stride_lb + h * stride_lh + i, mask=s_ok,
                  other=float("-inf"))
    # -- M = max_s lse_s, w_s = exp2(lse_s - M) (0 for a split that saw no key) --
    m = tl.max(lse, 0)
    if HAS_SINKS:
        # -- the sink joins once, as one more split with no value: M = max(M, sink),
        # sum w += exp2(sink - M); a row that saw no key gets O = 0, LSE = sink --
        sink2 = tl.load(SINKS + h) * 1.4426950408889634  # NOTE: log2(e)
        m = tl.maximum(m, sink2)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_safe)
    total = tl.sum(w, 0)
    if HAS_SINKS:
        total += tl.exp2(sink2 - m_safe)
    o = tl.load(O_part + offs_s[:, None] * stride_ps + b * stride_pb + h * stride_ph + i * stride_pm
                + offs_d[None, :] * stride_pd, mask=s_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    # -- O = sum_s w_s O_s / sum_s w_s --
    out = tl.sum(o * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    # NOTE: natural-log LSE as every backend returns it: (M + log2(sum w)) * ln 2.
    lse_out = tl.where(total > 0.0, (m_safe + tl.log2(tl.where(total > 0.0, total, 1.0))) * 0.6931471805599453,
                       MASKED_LSE)
    tl.store(Out + b * stride_ob + i * stride_om + h * stride_oh + offs_d * stride_od,
             out.to(Out.dtype.element_ty), mask=offs_d < D)
    tl.store(LSE + pid_bh * Nq + i, lse_out)


# ----------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------

#: Split-pass configs (BLOCK_N, num_warps, num_stages), the first the untuned default. The
#: pass streams K and V once, so the list varies how many keys are in flight per program.
SPLIT_CONFIGS = ((64, 4, 3), (128, 4, 3), (128, 8, 3), (64, 4, 4), (32, 4, 4), (128, 4, 2), (256, 8, 2),
                 (64, 8, 4))
#: The interpreter's one config (small tiles keep the CPU tests quick).
INTERPRETER_BLOCK_N = 16
_AUTOTUNE_KEY = ["Nq", "Nk", "NUM_SPLITS", "BLOCK_M", "HEAD_DIM", "HAS_SEQLENS", "MASK_LEFT", "MASK_RIGHT",
                 "DOT_PRECISION", "HAS_ALIBI", "HAS_SOFTCAP"]


def _triton_configs():
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n, w, s in SPLIT_CONFIGS]


#: Tuned once per shape class (the decode class of Nq, the power-of-two bucket of Nk) with picks kept on
#: disk, and timed briefly: the split pass takes microseconds, so 25 ms of repetitions rank the configs.
_SPLIT_TUNER = None if _INTERPRET else shape_class_autotuned(_decode_split_kernel, _triton_configs(), _AUTOTUNE_KEY,
                                                             name="decode_split", do_bench=short_bench)


def nk_bucket(nk: int) -> int:
    """The shape class of a cache of ``nk`` keys: the next power of two (at least 16)."""
    return max(16, triton.next_power_of_2(int(nk)))


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    # NOTE: the interpreter runs programs one after another; a nominal count keeps num_splits=0
    # exercising the split path on the CPU without launching hundreds of programs.
    return 4


def pick_num_splits(batch: int, nheads_k: int, m_blocks: int, nk_max: int, sm_count: int) -> int:
    """The split count num_splits=0 uses: enough programs for two waves over ``sm_count`` SMs,
    no split shorter than MIN_KEYS_PER_SPLIT keys of the bucket, at most MAX_SPLITS.

    From the bucket of nk_max, not nk_max itself, so every length in one bucket gets one count
    (and so one autotuner key)."""
    programs = batch * nheads_k * m_blocks
    wanted = max(1, (2 * sm_count) // programs)
    return max(1, min(wanted, nk_bucket(nk_max) // MIN_KEYS_PER_SPLIT, MAX_SPLITS))


def _dot_precision(dtype: torch.dtype) -> str:
    # NOTE: Triton's default for a float32 dot is TF32; float32 callers get IEEE float32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _flash_decode_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      cache_seqlens: Optional[torch.Tensor], softmax_scale: float, window_left: int,
                      window_right: int, num_splits: int, alibi_slopes: Optional[torch.Tensor] = None,
                      softcap: float = 0.0,
                      sink_logits: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    B, Nq, H, D = q.shape
    Nk_max, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = H // Hkv
    block_m = min(MAX_BLOCK_M if D <= 128 else MAX_BLOCK_M // 2, max(16, triton.next_power_of_2(group * Nq)))
    m_blocks = triton.cdiv(group * Nq, block_m)
    if num_splits <= 0:
        num_splits = pick_num_splits(B, Hkv, m_blocks, Nk_max, _sm_count(q.device))
    num_splits = min(num_splits, MAX_SPLITS)
    out = torch.empty((B, Nq, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    o_part = torch.empty((num_splits, B, H, Nq, D), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((num_splits, B, H, Nq), dtype=torch.float32, device=q.device)
    # NOTE: without per-sequence lengths the kernel never reads SEQLENS; q stands in for it.
    seqlens = q if cache_seqlens is None else cache_seqlens
    head_dim = triton.next_power_of_2(D)
    args = (q, k_cache, v_cache, seqlens, o_part, lse_part, *q.stride(), *k_cache.stride(), *v_cache.stride(),
            *o_part.stride(), *lse_part.stride()[:3], Hkv, group, Nq, Nk_max, softmax_scale * LOG2E,
            max(window_left, 0), max(window_right, 0), num_splits)
    # NOTE: the variants as flash_v2 takes them (SINKS only in the merge, where it joins once).
    variant, variant_flags = _variant_args(q, alibi_slopes, softcap, None, softmax_scale, sinks_arg=False)
    args = args + variant
    meta = dict(D=D, HEAD_DIM=head_dim, HAS_SEQLENS=cache_seqlens is not None, MASK_LEFT=window_left >= 0,
                MASK_RIGHT=window_right >= 0, DOT_PRECISION=_dot_precision(q.dtype), BLOCK_M=block_m,
                **variant_flags)
    grid = (num_splits, B * Hkv, m_blocks)
    if _INTERPRET:
        wrap_triton(_decode_split_kernel)[grid](*args, **meta, BLOCK_N=INTERPRETER_BLOCK_N)
    else:
        wrap_triton(_SPLIT_TUNER)[grid](*args, **meta)
    wrap_triton(_decode_combine_kernel)[(Nq, B * H)](
        o_part, lse_part, out, lse, q if sink_logits is None else sink_logits, *o_part.stride(),
        *lse_part.stride()[:3], *out.stride(), H, Nq, num_splits, D=D, HEAD_DIM=head_dim, MASKED_LSE=MASKED_ROW_LSE,
        HAS_SINKS=sink_logits is not None, BLOCK_S=max(2, triton.next_power_of_2(num_splits)))
    return out, lse


def _flash_decode_fwd_fake(q, k_cache, v_cache, cache_seqlens, softmax_scale, window_left, window_right, num_splits,
                           alibi_slopes=None, softcap=0.0, sink_logits=None):
    B, Nq, H, D = q.shape
    return q.new_empty((B, Nq, H, D)), q.new_empty((B, H, Nq), dtype=torch.float32)


_decode_op = register_op("flash_decode_fwd", _flash_decode_fwd, _flash_decode_fwd_fake)


def check_cache_seqlens(cache_seqlens, batch: int, device) -> Optional[torch.Tensor]:
    """None, or ``cache_seqlens`` (an int, or a (batch,) integer tensor on q's device) as a
    contiguous int32 (batch,) tensor."""
    if cache_seqlens is None:
        return None
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        return torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    if (not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype.is_floating_point
            or cache_seqlens.dtype == torch.bool or tuple(cache_seqlens.shape) != (batch,)):
        shape = tuple(cache_seqlens.shape) if isinstance(cache_seqlens, torch.Tensor) else type(cache_seqlens).__name__
        raise ValueError(f"cache_seqlens must be an int or an integer tensor of shape (batch,) = ({batch},), "
                         f"got {shape}")
    if cache_seqlens.device != device:
        raise ValueError(f"cache_seqlens must be on {device} like q, got {cache_seqlens.device}")
    return cache_seqlens.to(torch.int32).contiguous()


def check_num_splits(num_splits) -> int:
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or not (0 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"num_splits must be an int in 0..{MAX_SPLITS} (0: chosen from the SM count and the "
                         f"cache length), got {num_splits!r}")
    return num_splits


# ----------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------

def flash_decode(q, k_cache, v_cache, cache_seqlens=None, softmax_scale=None, causal: bool = False,
                 window_size=(-1, -1), num_splits: int = 0, return_lse: bool = False, alibi_slopes=None,
                 softcap: float = 0.0, sink_logits=None):
    """softmax(Q K^T * softmax_scale) V for a few queries per sequence against a KV cache.

    Arguments:
        q: (batch, seqlen_q, nheads, headdim), seqlen_q small (decoding: 1; speculative or
            chunked steps: up to about 16)
        k_cache, v_cache: (batch, seqlen_cache, nheads_k, headdim), nheads % nheads_k == 0;
            read in place (any strides), only the first cache_seqlens[b] positions of row b
        cache_seqlens: None (every row holds seqlen_cache keys), an int, or a (batch,) int32 /
            int64 tensor on q's device: the valid keys of each sequence
        softmax_scale: defaults to 1 / sqrt(headdim)
        causal: query i of sequence b sees keys j <= i + cache_seqlens[b] - seqlen_q, the mask
            aligned to the bottom-right corner of each sequence's own (seqlen_q, cache_seqlens[b]):
                seqlen_q=2, cache_seqlens[b]=5
                    1 1 1 1 0
                    1 1 1 1 1
        window_size: (left, right), -1 meaning infinite: query i sees keys in
            [pos - left, pos + right] with pos = i + cache_seqlens[b] - seqlen_q
        num_splits: how many programs share one sequence's key range; 0 picks from the SM
            count and the cache length (``pick_num_splits``); 1 is flash_v2's grid
        return_lse: also return the float32 logsumexp of each row
        alibi_slopes: optional float32 (nheads,) or (batch, nheads): key j gets the bias
            -slope * |i + cache_seqlens[b] - seqlen_q - j| in query i's row (in the split pass)
        softcap: 0 (off) or > 0: scores become softcap * tanh(scores / softcap) (split pass)
        sink_logits: optional float32 (nheads,): exp(sink_h) joins each row's denominator, added
            once in the logsumexp merge; the lse returned includes it
    Returns:
        out (batch, seqlen_q, nheads, headdim) in q's dtype [, lse (batch, nheads, seqlen_q)];
        a row that sees no key returns zeros and MASKED_ROW_LSE (its sink logit with sink_logits).
    float16, bfloat16 or float32, headdim 16..256, CUDA tensors (CPU under the interpreter).
    Forward only.
    """
    check_qkv(q, k_cache, v_cache, backend=BACKEND, head_dims=HEAD_DIMS,
              dtypes=(torch.float16, torch.bfloat16, torch.float32))
    check_triton_device(q)
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be True or False, got {causal!r}")
    left, right = normalize_window(window_size, causal)
    seqlens = check_cache_seqlens(cache_seqlens, q.shape[0], q.device)
    splits = check_num_splits(num_splits)
    scale = default_scale(softmax_scale, q.shape[-1])
    slopes = check_alibi_slopes(alibi_slopes, q.shape[0], q.shape[2], q.device)
    cap = check_softcap(softcap)
    sinks = check_sink_logits(sink_logits, q.shape[2], q.device)
    out, lse = _decode_op(q, k_cache, v_cache, seqlens, scale, left, right, splits, slopes, cap, sinks)
    return (out, lse) if return_lse else out


def autotune_picks(seq_len: Optional[int] = None) -> list[dict]:
    """The split-pass configs the autotuner picked in this process (see ``_autotune.picks``)."""
    return [] if _SPLIT_TUNER is None else [dict(row, kernel="decode_split") for row in picks(_SPLIT_TUNER)]


__all__ = ["flash_decode", "nk_bucket", "pick_num_splits", "autotune_picks"]
