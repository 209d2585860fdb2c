"""PyTorch's FlexAttention (``torch.nn.attention.flex_attention``) as a registered backend.

FlexAttention generates a fused FlashAttention-style kernel from a ``mask_mod`` (which
(query, key) pairs may attend) and a ``BlockMask`` (which key blocks each query block must
visit, and which of them need the mask). Here the mask_mod is the registry contract's:
query i sits at key position pos = i + seqlen_k - seqlen_q (bottom-right alignment) and
sees keys in [pos - left, pos + right] of window_size (left, right), causal being right = 0;
with doc_ids only keys of the document of key position pos. GQA is flex's ``enable_gqa``
(no copy of K or V); the logsumexp is flex's ``return_lse``. ALiBi and the soft-cap are a
``score_mod`` (``_score_mod``).

On CUDA the function is compiled once (``torch.compile(dynamic=False)``), so each new
(shape, mask) compiles one kernel; on the CPU it runs eagerly (flex's reference path,
which materialises the scores: small shapes only). Block masks are cached per (shape,
causal, window, doc_ids identity and version, device), so a benchmark's repeated calls do
not rebuild them.

Caution / known limits: no dropout (FlexAttention has none). Rows that see no key return
zeros and lse MASKED_ROW_LSE (flex returns -inf there). Every new shape or mask compiles
a kernel (the dynamo recompile limit is raised for it). ``bwd`` timings that call
``backward(retain_graph=True)`` need AOTAutograd's donated buffers off, which the first
compiled call sets.
"""

from __future__ import annotations

import collections
import functools

import torch

from ._common import (MASKED_ROW_LSE, check_alibi_slopes, check_doc_ids, check_dropout, check_qkv, check_softcap,
                      default_scale, normalize_window, refuse_variants, unsupported)

BACKEND = "flex"
_BLOCK_MASKS: collections.OrderedDict = collections.OrderedDict()
_BLOCK_MASK_CACHE_SIZE = 64


@functools.cache
def _compiled_flex():
    import torch._dynamo
    import torch._functorch.config
    from torch.nn.attention.flex_attention import flex_attention

    # NOTE: every (shape, mask) of a sweep is a new graph; the default recompile limit (8)
    # would silently fall back to eager FlexAttention, which materialises S.
    config = torch._dynamo.config
    for names in (("recompile_limit", "cache_size_limit"),  # the newer name first (torch >= 2.7)
                  ("accumulated_recompile_limit", "accumulated_cache_size_limit")):
        name = next((n for n in names if hasattr(config, n)), None)
        if name is not None:
            setattr(config, name, max(getattr(config, name), 4096))
    # NOTE: a benchmark's backward timing calls backward(retain_graph=True) repeatedly on one
    # graph, which AOTAutograd refuses for a backward compiled with donated buffers (a
    # memory-reuse optimisation; the kernels are the same without it).
    torch._functorch.config.donated_buffer = False
    return torch.compile(flex_attention, dynamic=False)


def _flex(device: torch.device):
    if device.type == "cuda":
        return _compiled_flex()
    from torch.nn.attention.flex_attention import flex_attention
    return flex_attention


def _mask_mod(Nq: int, Nk: int, left: int, right: int, doc_ids):
    """The contract's mask as a flex mask_mod: bottom-right alignment, window, documents."""
    shift = Nk - Nq

    def mask_mod(b, h, q_idx, kv_idx):
        pos = q_idx + shift
        keep = kv_idx >= 0  # all true, with the shape and type the other terms need
        if right >= 0:
            keep = keep & (kv_idx <= pos + right)
        if left >= 0:
            keep = keep & (kv_idx >= pos - left)
        if doc_ids is not None:
            keep = keep & (doc_ids[b, pos] == doc_ids[b, kv_idx])
        return keep

    return mask_mod


def _score_mod(Nq: int, Nk: int, slopes, cap: float):
    """The variants as a flex score_mod (the score arrives scaled): softcap * tanh(s / softcap),
    then ALiBi's -slope[b, h] * |q_idx + Nk - Nq - kv_idx|; None when neither is asked for."""
    if slopes is None and cap == 0.0:
        return None
    shift = Nk - Nq

    def score_mod(score, b, h, q_idx, kv_idx):
        if cap > 0.0:
            score = cap * torch.tanh(score / cap)
        if slopes is not None:
            score = score - slopes[b, h] * (q_idx + shift - kv_idx).abs()
        return score

    return score_mod


def _block_mask(B: int, Nq: int, Nk: int, left: int, right: int, doc_ids, device: torch.device):
    """The cached BlockMask of one (shape, window, doc_ids, device), or None when nothing is masked."""
    if left < 0 and right < 0 and doc_ids is None:
        return None
    from torch.nn.attention.flex_attention import create_block_mask

    docs = None if doc_ids is None else (id(doc_ids), doc_ids._version, doc_ids.data_ptr())
    key = (B if doc_ids is not None else None, Nq, Nk, left, right, docs, str(device))
    hit = _BLOCK_MASKS.get(key)
    if hit is not None:
        _BLOCK_MASKS.move_to_end(key)
        return hit[0]
    ids = None if doc_ids is None else doc_ids.to(torch.int64)
    block_mask = create_block_mask(_mask_mod(Nq, Nk, left, right, ids), key[0], None, Nq, Nk, device=device)
    # NOTE: the entry keeps doc_ids alive, so its id cannot be reused by another tensor while cached.
    _BLOCK_MASKS[key] = (block_mask, doc_ids)
    if len(_BLOCK_MASKS) > _BLOCK_MASK_CACHE_SIZE:
        _BLOCK_MASKS.popitem(last=False)
    return block_mask


def flex_attention_backend(q, k, v, *, causal: bool = False, softmax_scale=None, dropout_p: float = 0.0,
                           window_size=(-1, -1), doc_ids=None, return_lse: bool = False,
                           dropout_seed=None, return_dropout_mask: bool = False, alibi_slopes=None,
                           softcap: float = 0.0, sink_logits=None):
    """Attention through PyTorch's FlexAttention.

    Arguments as in fatrain.kernels (the registry); float16, bfloat16 or float32, headdim
    16..256; no options of its own. Limits: dropout_p > 0 and return_dropout_mask raise
    NotImplementedError (FlexAttention has no dropout); a dropout_seed is ignored at p = 0,
    as everywhere. alibi_slopes and softcap go into a ``score_mod`` (a new soft-cap value
    compiles a new kernel); sink_logits raise (no exact sink with a gradient through flex here).
    """
    refuse_variants(BACKEND, alibi_slopes, softcap, sink_logits, allowed=("alibi", "softcap"))
    B, Nq, Nk, H, Hkv, D = check_qkv(q, k, v, backend=BACKEND, head_dims=(16, 256),
                                     dtypes=(torch.float16, torch.bfloat16, torch.float32))
    check_doc_ids(doc_ids, B, Nk, q.device)
    if doc_ids is not None and Nq > Nk:
        raise ValueError(f"doc_ids need seqlen_q <= seqlen_k, got seqlen_q {Nq} > seqlen_k {Nk}")
    scale = default_scale(softmax_scale, D)
    slopes = check_alibi_slopes(alibi_slopes, B, H, q.device)
    score_mod = _score_mod(Nq, Nk, slopes, check_softcap(softcap))
    if check_dropout(dropout_p) > 0.0:
        raise unsupported(BACKEND, "dropout_p > 0", "FlexAttention has no attention dropout")
    if return_dropout_mask:
        raise unsupported(BACKEND, "return_dropout_mask", "FlexAttention has no attention dropout")
    left, right = normalize_window(window_size, causal)
    block_mask = _block_mask(B, Nq, Nk, left, right, doc_ids, q.device)
    result = _flex(q.device)(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                             score_mod=score_mod, scale=scale, enable_gqa=Hkv != H, return_lse=return_lse)
    if not return_lse:
        return result.transpose(1, 2)
    out, lse = result
    # NOTE: flex gives a row that sees no key lse = -inf (and out = 0); the contract says MASKED_ROW_LSE.
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, MASKED_ROW_LSE), lse)
    return out.transpose(1, 2), lse.float()
