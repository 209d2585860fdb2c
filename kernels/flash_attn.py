"""flash-attn 2.x's public functions on top of fatrain's registry: a flash-attn user changes one import.

    from flash_attn import flash_attn_func, flash_attn_with_kvcache          # before
    from fatrain.kernels.flash_attn import flash_attn_func, flash_attn_with_kvcache  # after

Every function keeps flash-attn's name, argument order, defaults, layouts and return values:
    flash_attn_func(q, k, v, ...)                     q (B, N, H, D), k, v (B, N, Hkv, D)
    flash_attn_qkvpacked_func(qkv, ...)               qkv (B, N, 3, H, D)
    flash_attn_kvpacked_func(q, kv, ...)              kv (B, N, 2, Hkv, D)
    flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)
    flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, ...)   qkv (total, 3, H, D)
    flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)
    flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, ..., cache_seqlens=None, ...)
``return_attn_probs=True`` returns ``(out, softmax_lse, None)``: the logsumexp as flash-attn
returns it, (B, H, N) or (H, total_q) for varlen, and no attention probabilities (fatrain
never materialises them). The calls run on the registry backend ``flash_v2`` unless another
is chosen: ``set_backend(name)``, ``with use_backend(name):`` or the keyword-only
``backend=name`` that every function takes after flash-attn's own arguments.

``softcap`` and ``alibi_slopes`` ((nheads,) or (batch, nheads) float32, flash-attn's ALiBi) go
to the backend, which must have the registry features ``softcap`` / ``alibi`` (flash_v2 and
its decode kernel do; another backend raises naming itself and the feature). An argument
fatrain does not implement (rotary_cos / rotary_sin, rotary_interleaved=False,
cache_batch_idx, cache_leftpad, block_table) raises NotImplementedError naming it when given
a value other than flash-attn's default; none is ignored. ``deterministic=True`` asks backends with that option for their deterministic
backward; False (flash-attn's default) leaves the backend's own default, which for flash_v2
is deterministic too.

flash_attn_with_kvcache on flash_v2 runs ``decode.flash_decode`` (split-K over the cache,
per-sequence lengths) for up to DECODE_MAX_SEQLEN_Q queries or per-sequence cache lengths,
and flash_v2 on the valid prefix (a view of the cache, no copy) for a longer chunk of queries
against one common length; other backends take the prefix view per distinct length.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch

from . import backend_info, get_backend
from .varlen import varlen_attention

DEFAULT_BACKEND = "flash_v2"
#: flash_attn_with_kvcache on flash_v2 uses the decode kernel up to this many queries per sequence.
DECODE_MAX_SEQLEN_Q = 16

_backend = DEFAULT_BACKEND


def set_backend(name: str) -> None:
    """Route every function of this module to registry backend ``name`` (an unknown name lists
    the valid ones)."""
    global _backend
    backend_info(name)
    _backend = name


def current_backend() -> str:
    """The registry backend the functions of this module call when no ``backend=`` is given."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("sdpa"): ...``: the functions of this module call ``name`` inside the block."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _resolve(backend: Optional[str]) -> str:
    if backend is None:
        return _backend
    backend_info(backend)
    return backend


def _refuse_unimplemented(**given) -> None:
    """NotImplementedError naming each flash-attn argument that is set but not implemented here;
    ``given`` maps a name to (value, flash-attn's default)."""
    bad = [name for name, (value, default) in given.items()
           if not (value is default or (not isinstance(value, torch.Tensor) and value == default))]
    if bad:
        raise NotImplementedError(
            f"fatrain.kernels.flash_attn does not implement {', '.join(bad)} "
            f"(leave {'it' if len(bad) == 1 else 'them'} at flash-attn's default)")


def _variant_kwargs(softcap, alibi_slopes) -> dict:
    """flash-attn's softcap and alibi_slopes as the attention call's keywords (only those that are set)."""
    kwargs = {}
    if softcap is None or isinstance(softcap, torch.Tensor) or softcap != 0.0:
        kwargs["softcap"] = softcap
    if alibi_slopes is not None:
        kwargs["alibi_slopes"] = alibi_slopes
    return kwargs


def _backend_kwargs(name: str, deterministic) -> dict:
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic must be True or False, got {deterministic!r}")
    return {"deterministic": True} if deterministic and "deterministic" in backend_info(name).options else {}


def _check_return_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
           return_attn_probs, backend):
    name = _resolve(backend)
    return_attn_probs = _check_return_flag("return_attn_probs", return_attn_probs)
    kwargs = dict(causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                  return_lse=return_attn_probs, **_backend_kwargs(name, deterministic),
                  **_variant_kwargs(softcap, alibi_slopes))
    if dropout_p:
        kwargs["dropout_p"] = dropout_p
    result = get_backend(name)(q, k, v, **kwargs)
    if return_attn_probs:
        out, lse = result
        return out, lse, None
    return result


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
            window_size, softcap, alibi_slopes, deterministic, return_attn_probs, backend):
    name = _resolve(backend)
    return_attn_probs = _check_return_flag("return_attn_probs", return_attn_probs)
    # NOTE: varlen_attention takes no backend options; the registry's flash backends run their
    # deterministic backward by default, so deterministic=True is met without one.
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic must be True or False, got {deterministic!r}")
    result = varlen_attention(name, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              causal=causal, softmax_scale=softmax_scale, dropout_p=dropout_p,
                              window_size=window_size, return_lse=return_attn_probs,
                              **_variant_kwargs(softcap, alibi_slopes))
    if return_attn_probs:
        out, lse = result
        return out, lse, None
    return result


def _check_packed(name: str, t, dims: int, at: int, count: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != dims or t.shape[at] != count:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must have the layout {layout}, got {shape}")


# ----------------------------------------------------------------------------------------
# Padded batches
# ----------------------------------------------------------------------------------------

def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, backend=None):
    """softmax(Q K^T * softmax_scale) V, flash-attn's ``flash_attn_func``.

    Arguments:
        q: (batch_size, seqlen_q, nheads, headdim)
        k, v: (batch_size, seqlen_k, nheads_k, headdim); nheads % nheads_k == 0 (GQA/MQA: query
            heads h * nheads // nheads_k ... attend to key/value head h)
        dropout_p: dropout probability (0.0 for evaluation)
        softmax_scale: defaults to 1 / sqrt(headdim)
        causal: the mask is aligned to the bottom-right corner when seqlen_q != seqlen_k:
                seqlen_q=2, seqlen_k=5      seqlen_q=5, seqlen_k=2
                    1 1 1 1 0                   0 0
                    1 1 1 1 1                   0 0
                                                0 0
                                                1 0
                                                1 1
            (a row of zeros returns zeros)
        window_size: (left, right), -1 meaning infinite; query i sees keys in
            [i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]
        softcap: 0.0 (off) or > 0: scores become softcap * tanh(scores / softcap)
        alibi_slopes: None, or float32 (nheads,) or (batch_size, nheads): key j gets the bias
            -slope * |i + seqlen_k - seqlen_q - j| in query i's row
        deterministic: True asks for the backend's deterministic backward
        return_attn_probs: also return softmax_lse and None (in place of the probabilities)
        backend: keyword only, not flash-attn's: the registry backend (default: current_backend())
        sink_logits: keyword only, not flash-attn's: optional float32 (nheads,) learnable sink logits
            (gpt-oss's), one more term in each row's softmax denominator (the decode kernel adds it
            in its merge)
    Returns:
        out (batch_size, seqlen_q, nheads, headdim) [, softmax_lse (batch_size, nheads, seqlen_q), None]
    """
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs, backend)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                              backend=None):
    """``flash_attn_func`` on q, k, v stacked in one tensor, qkv (batch_size, seqlen, 3, nheads,
    headdim) (views, no copy). Arguments and returns as flash_attn_func's."""
    _check_packed("qkv", qkv, 5, 2, 3, "(batch_size, seqlen, 3, nheads, headdim)")
    return _dense(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size, softcap,
                  alibi_slopes, deterministic, return_attn_probs, backend)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                             backend=None):
    """``flash_attn_func`` with k and v stacked, kv (batch_size, seqlen_k, 2, nheads_k, headdim)
    (views, no copy). Arguments and returns as flash_attn_func's."""
    _check_packed("kv", kv, 5, 2, 2, "(batch_size, seqlen_k, 2, nheads_k, headdim)")
    return _dense(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                  deterministic, return_attn_probs, backend)


# ----------------------------------------------------------------------------------------
# Packed (varlen) batches
# ----------------------------------------------------------------------------------------

def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, backend=None):
    """Attention over sequences packed without padding, flash-attn's ``flash_attn_varlen_func``.

    Arguments:
        q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim)
        cu_seqlens_q, cu_seqlens_k: (batch_size + 1,) int32 cumulative lengths, from 0 to total
        max_seqlen_q, max_seqlen_k: the longest query / key sequence
        causal, window_size: per sequence, aligned to the bottom-right of each sequence's
            (seqlen_q_b, seqlen_k_b) as flash_attn_func's
        block_table: not implemented (None only); softcap, deterministic, return_attn_probs,
            backend: as flash_attn_func's; alibi_slopes: (nheads,) or (batch_size, nheads) float32,
            the bias within each sequence
    Returns:
        out (total_q, nheads, headdim) [, softmax_lse (nheads, total_q), None]
    Through ``varlen.varlen_attention`` (its limits on the q and k packings apply).
    """
    _refuse_unimplemented(block_table=(block_table, None))
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                   causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs, backend)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, backend=None):
    """``flash_attn_varlen_func`` on qkv (total, 3, nheads, headdim) with one packing for q, k and v."""
    _check_packed("qkv", qkv, 4, 1, 3, "(total, 3, nheads, headdim)")
    return _varlen(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                   backend)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                                    backend=None):
    """``flash_attn_varlen_func`` with kv (total_k, 2, nheads_k, headdim)."""
    _check_packed("kv", kv, 4, 1, 2, "(total_k, 2, nheads_k, headdim)")
    return _varlen(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                   backend)


# ----------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------

def _append_to_cache(k_cache, v_cache, k, v, cache_seqlens):
    """Write k, v (B, Nnew, Hkv, D) into the caches in place at positions cache_seqlens[b] ...
    cache_seqlens[b] + Nnew - 1 of each row b; return the lengths after the append."""
    for name, new, cache in (("k", k, k_cache), ("v", v, v_cache)):
        if not isinstance(new, torch.Tensor) or new.dim() != 4 or new.shape[0] != cache.shape[0] \
                or new.shape[2:] != cache.shape[2:]:
            shape = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise ValueError(f"{name} must be (batch_size, seqlen_new, nheads_k, headdim) = "
                             f"({cache.shape[0]}, seqlen_new, {cache.shape[2]}, {cache.shape[3]}) like "
                             f"{name}_cache, got {shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    n_new, capacity = k.shape[1], k_cache.shape[1]
    if isinstance(cache_seqlens, int):
        if cache_seqlens + n_new > capacity:
            raise ValueError(f"cache_seqlens {cache_seqlens} + {n_new} new keys exceed the cache's "
                             f"{capacity} positions")
        k_cache[:, cache_seqlens:cache_seqlens + n_new] = k
        v_cache[:, cache_seqlens:cache_seqlens + n_new] = v
        return cache_seqlens + n_new
    # NOTE: no host read of the lengths (no device sync); a position past the cache's end is an
    # out-of-range index, which torch reports (a device-side assert on CUDA).
    rows = torch.arange(k.shape[0], device=k.device)[:, None]
    cols = cache_seqlens.to(torch.long)[:, None] + torch.arange(n_new, device=k.device)[None, :]
    k_cache[rows, cols] = k
    v_cache[rows, cols] = v
    return cache_seqlens + n_new


def _uniform_length(cache_seqlens, capacity: int) -> Optional[int]:
    """The one cache length of every row as an int (None: the whole cache), or -1 when rows differ."""
    if cache_seqlens is None:
        return capacity
    if isinstance(cache_seqlens, int):
        return cache_seqlens
    lengths = set(cache_seqlens.tolist())
    return lengths.pop() if len(lengths) == 1 else -1


def _kvcache_attention(name, q, k_cache, v_cache, cache_seqlens, softmax_scale, causal, window_size, num_splits,
                       variants: dict):
    """(out, lse) over each row's valid prefix of the caches; ``variants``: softcap, alibi_slopes, sink_logits."""
    capacity = k_cache.shape[1]
    if name == "flash_v2" and (q.shape[1] <= DECODE_MAX_SEQLEN_Q or isinstance(cache_seqlens, torch.Tensor)):
        from .decode import flash_decode
        return flash_decode(q, k_cache, v_cache, cache_seqlens=cache_seqlens, softmax_scale=softmax_scale,
                            causal=causal, window_size=window_size, num_splits=num_splits, return_lse=True,
                            **variants)
    attn = get_backend(name)
    kwargs = dict(causal=causal, softmax_scale=softmax_scale, window_size=window_size, return_lse=True, **variants)
    length = _uniform_length(cache_seqlens, capacity)
    if length >= 0:
        if not 1 <= length <= capacity:
            raise ValueError(f"cache_seqlens must be in 1..{capacity} (the cache's positions), got {length}")
        return attn(q, k_cache[:, :length], v_cache[:, :length], **kwargs)
    # Rows of different lengths: one call per row on its own prefix (host-side lengths).
    outs, lses = [], []
    for b, n in enumerate(cache_seqlens.tolist()):
        if not 1 <= n <= capacity:
            raise ValueError(f"cache_seqlens[{b}] must be in 1..{capacity} (the cache's positions), got {n}")
        slopes = kwargs.get("alibi_slopes")
        row = kwargs if slopes is None or slopes.dim() == 1 else dict(kwargs, alibi_slopes=slopes[b:b + 1])
        out, lse = attn(q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n], **row)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
                            cache_batch_idx: Optional[torch.Tensor] = None,
                            cache_leftpad: Optional[torch.Tensor] = None, block_table: Optional[torch.Tensor] = None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False, *,
                            backend=None, sink_logits=None):
    """Attention of q over a preallocated KV cache, after appending k and v to it in place
    (flash-attn's ``flash_attn_with_kvcache``). Forward only.

    If k and v are given, k_cache and v_cache are updated in place: row b's new keys go to
    positions cache_seqlens[b] ... cache_seqlens[b] + seqlen_new - 1 (the cache must be large
    enough), and attention then runs over the first cache_seqlens[b] + seqlen_new positions.

    Arguments:
        q: (batch_size, seqlen_q, nheads, headdim)
        k_cache, v_cache: (batch_size, seqlen_cache, nheads_k, headdim), nheads % nheads_k == 0
        k, v: optional (batch_size, seqlen_new, nheads_k, headdim), appended at cache_seqlens
            (which must then be given)
        cache_seqlens: an int, or (batch_size,) int32 on q's device: the valid positions of each
            row before the append; None: the whole cache is valid
        softmax_scale: defaults to 1 / sqrt(headdim)
        causal: aligned to the bottom-right of each row's (seqlen_q, valid keys):
                seqlen_q=2, cache_seqlens[b] + seqlen_new = 5
                    1 1 1 1 0
                    1 1 1 1 1
        window_size: (left, right), -1 meaning infinite, from query i's position
            i + (valid keys) - seqlen_q
        num_splits: the decode kernel's split count (0: its heuristic); flash_v2 only
        return_softmax_lse: also return softmax_lse (batch_size, nheads, seqlen_q)
        softcap, alibi_slopes: as flash_attn_func's (the decode kernel applies them in its split pass)
        rotary_cos, rotary_sin, cache_batch_idx, cache_leftpad, block_table,
        rotary_interleaved=False: not implemented (flash-attn's defaults only)
        backend: keyword only, not flash-attn's: the registry backend (default: current_backend())
    Returns:
        out (batch_size, seqlen_q, nheads, headdim) [, softmax_lse (batch_size, nheads, seqlen_q)]
    """
    _refuse_unimplemented(rotary_cos=(rotary_cos, None), rotary_sin=(rotary_sin, None),
                          cache_batch_idx=(cache_batch_idx, None), cache_leftpad=(cache_leftpad, None),
                          block_table=(block_table, None), rotary_interleaved=(rotary_interleaved, True))
    name = _resolve(backend)
    return_softmax_lse = _check_return_flag("return_softmax_lse", return_softmax_lse)
    if name != "flash_v2" and num_splits != 0:
        raise ValueError(f"num_splits is an option of the flash_v2 decode kernel, not of backend {name}")
    for label, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{label} must have 4 dims (batch_size, seqlen, nheads, headdim), got {shape}")
    if isinstance(cache_seqlens, bool) or not (cache_seqlens is None or isinstance(cache_seqlens, (int, torch.Tensor))):
        raise ValueError(f"cache_seqlens must be an int or a (batch_size,) int32 tensor, got {cache_seqlens!r}")
    if isinstance(cache_seqlens, torch.Tensor):
        from .decode import check_cache_seqlens
        cache_seqlens = check_cache_seqlens(cache_seqlens, q.shape[0], q.device)
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (or both None)")
    if k is not None:
        if cache_seqlens is None:
            raise ValueError("k and v are appended at cache_seqlens: give cache_seqlens (an int or a (batch_size,) "
                             "int32 tensor) with them")
        cache_seqlens = _append_to_cache(k_cache, v_cache, k, v, cache_seqlens)
    variants = _variant_kwargs(softcap, alibi_slopes)
    if sink_logits is not None:
        variants["sink_logits"] = sink_logits
    out, lse = _kvcache_attention(name, q, k_cache, v_cache, cache_seqlens, softmax_scale, causal, window_size,
                                  num_splits, variants)
    return (out, lse) if return_softmax_lse else out


__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache",
           "set_backend", "current_backend", "use_backend", "DEFAULT_BACKEND"]
