"""Shared argument checks, mask geometry and torch.library op registration for the kernels.

Every backend validates through the same functions, so a bad argument gets the same
message whatever backend it reaches. Messages name the argument, what was given, and
what is allowed.
"""

from __future__ import annotations

import math
import os

import torch
from torch.library import custom_op, triton_op

#: Value of the logsumexp of a row whose keys are all masked out (its output is zero).
#: Finite on purpose: the backward recomputes P = exp(S - LSE) with S = -inf on masked
#: entries, so any finite value gives P = 0 and no NaN can appear.
MASKED_ROW_LSE = 0.0


def unsupported(backend: str, feature: str, hint: str = "") -> NotImplementedError:
    msg = f"attention backend '{backend}' does not support {feature}"
    if hint:
        msg += f" ({hint})"
    return NotImplementedError(msg)


def normalize_window(window_size, causal: bool) -> tuple[int, int]:
    """Return (left, right) with -1 meaning unlimited; causal forces right = 0."""
    try:
        left, right = (int(w) for w in window_size)
    except (TypeError, ValueError):
        raise ValueError(
            f"window_size must be a pair of ints (left, right) with -1 meaning unlimited, got {window_size!r}"
        ) from None
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 means unlimited), got {window_size!r}")
    if causal:
        right = 0
    return left, right


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str,
              head_dims: tuple[int, int] = (1, 1 << 30),
              dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)):
    """Validate the (B, N, H, D) layout shared by all backends; return (B, Nq, Nk, H, Hkv, D)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dims (batch, seqlen, nheads, headdim), got shape {tuple(t.shape)}"
            )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got q on {q.device}, k on {k.device}, v on {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if q.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"dtype {str(q.dtype).replace('torch.', '')} is not supported by {backend} (supported: {allowed})")
    B, Nq, H, D = q.shape
    Bk, Nk, Hkv, Dk = k.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if Bk != B:
        raise ValueError(f"q and k must have the same batch size, got {B} and {Bk}")
    if Dk != D:
        raise ValueError(f"q and k must have the same head dim, got {D} and {Dk}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(
            f"the number of query heads ({H}) must be a multiple of the number of key/value heads ({Hkv})"
        )
    lo, hi = head_dims
    if not (lo <= D <= hi):
        raise ValueError(f"head_dim {D} is not supported by {backend} (supported: {lo}..{hi})")
    if Nq == 0 or Nk == 0 or B == 0:
        raise ValueError(f"empty input: batch {B}, seqlen_q {Nq}, seqlen_k {Nk} must all be >= 1")
    return B, Nq, Nk, H, Hkv, D


#: The kernels compute a row's offset inside one sequence (row x row stride) in 32-bit integers.
INT32_OFFSETS = 2**31


def check_row_offsets(backend: str, **tensors: tuple[int, int]) -> None:
    """Refuse, in one line, a tensor whose rows (``rows``, ``stride`` of one row) reach 2^31
    elements within one sequence: the kernels' 32-bit offsets would wrap and address memory
    outside it. ``tensors`` maps a name to (rows, row stride), e.g. q=(seqlen_q, q.stride(1))."""
    for name, (rows, stride) in tensors.items():
        if rows > 0 and (rows - 1) * stride >= INT32_OFFSETS:
            raise ValueError(f"{name} has {rows} rows of {stride} elements: {backend} addresses a sequence's rows with "
                             f"32-bit offsets, so at most {(INT32_OFFSETS - 1) // stride + 1} rows at this row stride "
                             f"(split the sequence, e.g. over trainer.context_parallel ranks)")


def check_doc_ids(doc_ids, B: int, Nk: int, device) -> None:
    if doc_ids is None:
        return
    if not isinstance(doc_ids, torch.Tensor) or doc_ids.dim() != 2 or tuple(doc_ids.shape) != (B, Nk):
        shape = tuple(doc_ids.shape) if isinstance(doc_ids, torch.Tensor) else type(doc_ids).__name__
        raise ValueError(f"doc_ids must be an integer tensor of shape (batch, seqlen_k) = {(B, Nk)}, got {shape}")
    if doc_ids.dtype.is_floating_point or doc_ids.dtype == torch.bool:
        raise ValueError(f"doc_ids must hold integers, got {doc_ids.dtype}")
    if doc_ids.device != device:
        raise ValueError(f"doc_ids must be on {device} like q, got {doc_ids.device}")


def default_scale(softmax_scale, head_dim: int) -> float:
    """``softmax_scale``, or 1 / sqrt(head_dim) for None; it must be a finite number > 0.

    NOTE: S = softmax_scale * Q K^T is formed in float32 (in the input dtype in naive), so a
    finite scale large enough that |S| exceeds float32's range (about 3.4e38, e.g. a scale of
    1e38 with unit-size rows) overflows to inf and the output is NaN, as any float32 softmax
    would be; only the float64 reference computes such scales. Which scales overflow depends on
    the data, so they are not refused here.
    """
    if softmax_scale is None:
        return head_dim ** -0.5
    try:
        scale = float(softmax_scale)
    except (TypeError, ValueError):
        raise ValueError(f"softmax_scale must be a finite number > 0 (or None: 1/sqrt(headdim)), "
                         f"got {softmax_scale!r}") from None
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"softmax_scale must be a finite number > 0 (or None: 1/sqrt(headdim)), got {softmax_scale}")
    return scale


def check_triton_device(q: torch.Tensor) -> None:
    """The Triton kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if not (q.device.type == "cuda" or (interpret and q.device.type == "cpu")):
        raise ValueError(f"q, k and v must be CUDA tensors (or CPU tensors under the Triton interpreter), "
                         f"got {q.device}")


def check_deterministic(deterministic) -> bool:
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic must be True or False, got {deterministic!r}")
    return deterministic


def check_dropout(dropout_p) -> float:
    p = float(dropout_p)
    if not (0.0 <= p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return p


def allowed_mask(Nq: int, Nk: int, *, causal: bool, window_size=(-1, -1), doc_ids=None, device=None):
    """Boolean mask of the (query, key) pairs that may attend: (Nq, Nk), or (B, Nq, Nk) with doc_ids.

    Query i sits at key position i + Nk - Nq (bottom-right alignment, as flash-attn >= 2.1),
    so with causal=True query i sees keys j <= i + Nk - Nq. A window (left, right) keeps
    keys with i + Nk - Nq - left <= j <= i + Nk - Nq + right. With doc_ids, a query sees
    only keys of its own document.
    """
    left, right = normalize_window(window_size, causal)
    rows = torch.arange(Nq, device=device)[:, None] + (Nk - Nq)
    cols = torch.arange(Nk, device=device)[None, :]
    mask = torch.ones(Nq, Nk, dtype=torch.bool, device=device)
    if right >= 0:
        mask &= cols <= rows + right
    if left >= 0:
        mask &= cols >= rows - left
    if doc_ids is not None:
        doc_q = doc_ids[:, Nk - Nq:] if Nk >= Nq else None
        if doc_q is None:
            raise ValueError(f"doc_ids need seqlen_q <= seqlen_k, got seqlen_q {Nq} > seqlen_k {Nk}")
        mask = mask[None] & (doc_q[:, :, None] == doc_ids[:, None, :])
    return mask


def needs_mask(Nq: int, Nk: int, causal: bool, window_size, doc_ids) -> bool:
    left, right = normalize_window(window_size, causal)
    return causal or left >= 0 or right >= 0 or doc_ids is not None


def register_op(name: str, launcher, fake):
    """``launcher`` as the torch.library op ``fatrain::<name>``, so torch.compile traces it: a
    triton_op on CUDA (its kernels launched through wrap_triton); an opaque custom_op with the
    ``fake`` shape function under the Triton interpreter.

    NOTE (2026-11, torch 2.13 / triton 3.9): wrap_triton's fake-tensor tracing runs the
    interpreted kernel on FakeTensors, which have no data, so torch.compile fails on CPU.
    The interpreter path therefore registers an opaque op; both trace with fullgraph=True.
    """
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        op = custom_op(f"fatrain::{name}", mutates_args=())(launcher)
        op.register_fake(fake)
        return op
    return triton_op(f"fatrain::{name}", mutates_args=())(launcher)


def check_alibi_slopes(alibi_slopes, B: int, H: int, device):
    """``alibi_slopes`` as a float32 (B, H) tensor (an (H,) one is broadcast over the batch), or
    None. flash-attn's definition: key j gets the bias ``-slope * |i + Nk - Nq - j|`` in query
    i's row, added after the softmax scale (and after the soft-cap)."""
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be a float32 tensor of shape (nheads,) = ({H},) or "
                        f"(batch, nheads) = {(B, H)}, got {type(alibi_slopes).__name__}")
    if tuple(alibi_slopes.shape) not in ((H,), (B, H)):
        raise ValueError(f"alibi_slopes must have shape (nheads,) = ({H},) or (batch, nheads) = {(B, H)}, "
                         f"got {tuple(alibi_slopes.shape)}")
    if alibi_slopes.dtype != torch.float32:
        raise ValueError(f"alibi_slopes must be float32, got {str(alibi_slopes.dtype).replace('torch.', '')}")
    if alibi_slopes.device != device:
        raise ValueError(f"alibi_slopes must be on {device} like q, got {alibi_slopes.device}")
    return alibi_slopes.expand(B, H)


def check_softcap(softcap) -> float:
    """``softcap`` as a float: 0 turns it off; > 0 makes the scaled scores ``softcap * tanh(s / softcap)``."""
    try:
        cap = float(softcap if softcap is not None else 0.0)
    except (TypeError, ValueError):
        raise ValueError(f"softcap must be a finite number >= 0 (0: off), got {softcap!r}") from None
    if not (math.isfinite(cap) and cap >= 0.0):
        raise ValueError(f"softcap must be a finite number >= 0 (0: off), got {softcap}")
    return cap


def check_sink_logits(sink_logits, H: int, device):
    """``sink_logits``: a float32 (nheads,) tensor (one logit per query head, in every row's
    softmax denominator, with no value: gpt-oss's attention sinks), or None."""
    if sink_logits is None:
        return None
    if not isinstance(sink_logits, torch.Tensor):
        raise TypeError(f"sink_logits must be a float32 tensor of shape (nheads,) = ({H},), "
                        f"got {type(sink_logits).__name__}")
    if tuple(sink_logits.shape) != (H,):
        raise ValueError(f"sink_logits must have shape (nheads,) = ({H},), got {tuple(sink_logits.shape)}")
    if sink_logits.dtype != torch.float32:
        raise ValueError(f"sink_logits must be float32, got {str(sink_logits.dtype).replace('torch.', '')}")
    if sink_logits.device != device:
        raise ValueError(f"sink_logits must be on {device} like q, got {sink_logits.device}")
    return sink_logits


def alibi_bias(alibi_slopes, Nq: int, Nk: int, dtype=torch.float32):
    """The (B, H, Nq, Nk) ALiBi bias ``-slope * |i + Nk - Nq - j|`` of (B, H) slopes (materialised:
    for the reference and naive)."""
    rows = torch.arange(Nq, device=alibi_slopes.device)[:, None] + (Nk - Nq)
    cols = torch.arange(Nk, device=alibi_slopes.device)[None, :]
    dist = (rows - cols).abs().to(dtype)
    return -alibi_slopes.to(dtype)[:, :, None, None] * dist


def alibi_slopes_for(nheads: int) -> torch.Tensor:
    """The ALiBi paper's slopes for ``nheads`` heads (Press et al.): a geometric sequence starting
    at 2^(-8/n) for the largest power of two n <= nheads, then the odd terms of the sequence for
    2n interleaved for the remaining heads. float32 (nheads,)."""
    if nheads < 1:
        raise ValueError(f"nheads must be >= 1, got {nheads}")

    def powers(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    n = 1 << (nheads.bit_length() - 1)
    slopes = powers(n)
    if n < nheads:
        slopes += powers(2 * n)[0::2][: nheads - n]
    return torch.tensor(slopes, dtype=torch.float32)


def refuse_variants(backend: str, alibi_slopes=None, softcap=0.0, sink_logits=None, *, allowed=()) -> None:
    """Raise the missing-feature error for a variant ``backend`` does not take ('alibi',
    'softcap', 'sinks'; those in ``allowed`` pass)."""
    for feature, arg, given in (("alibi", "alibi_slopes", alibi_slopes is not None),
                                ("softcap", "softcap", bool(softcap)),
                                ("sinks", "sink_logits", sink_logits is not None)):
        if given and feature not in allowed:
            raise unsupported(backend, f"{feature} ({arg})", "backends with it: see backend_info(name).features")
