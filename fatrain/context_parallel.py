"""Context parallelism: one sequence split over the N ranks of a context-parallel group.

``trainer.context_parallel=N`` lays the ranks out as a 2-D ``DeviceMesh`` (data x context):
global rank = dp_index * N + cp_index. The N ranks of a context group read the same batch
(the data loader is sharded over the data-parallel index only) and each keeps its shard of
every sequence, load-balanced for causal attention as in torchtitan and Megatron: the
sequence is cut into 2N chunks of C = seq_len / 2N tokens and rank i holds chunks i and
2N-1-i, so every rank does the same attention work. RoPE positions and document ids are the
full sequence's (``shard_batch``); each rank's loss is the mean over its own tokens, all
ranks hold as many, so DDP's or FSDP2's gradient mean over every rank of the mesh (data and
context together) is the gradient of the loss averaged over all tokens of all ranks.

Attention (``trainer.cp_strategy``) replaces the backend call of each block
(``ContextParallel.install``); projections, RoPE, MLP and loss stay per token:

- ``ring``: the local Q shard stays; K/V shards of the KV heads go around the group with
  point-to-point ops (``batch_isend_irecv``, the next shard in flight while this one is
  computed): at step t of N rank r attends to the shard of rank r - t, sent to it directly,
  and only where some pair of it is visible. Each step calls the backend with
  ``return_lse=True`` on chunk pairs and merges the partial outputs by their logsumexp:
      lse = logaddexp(lse_acc, lse_i)    O = exp(lse_acc - lse) O_acc + exp(lse_i - lse) O_i
  A chunk pair is one backend call on a (rows x keys) rectangle whose mask the backend's
  own contract expresses: the diagonal pair (same chunk) is causal with the window and the
  document ids; a key chunk after the query chunk is skipped; a key chunk before it sees
  the whole chunk, or, under a sliding window, a band j >= i + m that becomes
  ``window_size=(left, -1)`` on sliced rows and keys; packed documents leave only the one
  document that runs across both chunks (a rectangle, per sequence of the batch). Fully
  masked pairs cost no call, and a shard no query of a rank sees is not sent there (under a
  sliding window of W <= C tokens each rank receives two shards, whatever N). The backward
  sends K/V the same way; each rank's share of dK/dV (float32) goes back to the shard's owner.
  Each pair reuses the backend's recompute backward (``fatrain.kernels.get_backward``) with
  the merged O and LSE.
- ``ulysses``: an all-to-all turns the sequence-sharded Q, K, V (all heads) into
  head-sharded full sequences (H/N heads, Hkv/N KV heads per rank), any backend runs
  there unchanged, and a second all-to-all brings the output back.

Caution / known limits: attention dropout is not supported (its counter-based mask is keyed
on positions inside one call), nor the attention variants (ALiBi, soft-capping, sinks). Document masking needs non-decreasing document
ids in each sequence (the packer's); the ring then makes one backend call per sequence of
the batch for pairs that a document crosses.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.distributed as dist

CP_STRATEGIES = ("ring", "ulysses")


# ----- settings ------------------------------------------------------------------------------------------


def check_context_parallel_config(cfg) -> None:
    """The checks that need only the config (before any process group): one-line ValueErrors."""
    from fatrain.kernels import available_backends, backend_info

    t, m, a = cfg.trainer, cfg.model, cfg.attention
    n = t.context_parallel
    if t.cp_strategy not in CP_STRATEGIES:
        raise ValueError(f"trainer.cp_strategy={t.cp_strategy!r} is not allowed (choose from: {', '.join(CP_STRATEGIES)})")
    if n == 1:
        return
    if t.strategy == "single":
        raise ValueError(f"trainer.context_parallel={n} needs trainer.strategy=ddp or fsdp (launched with torchrun), "
                         "which average the gradients over the context-parallel ranks")
    seq_len = cfg.data.seq_len
    if seq_len % (2 * n):
        raise ValueError(f"data.seq_len={seq_len} must be divisible by 2 x trainer.context_parallel = {2 * n} "
                         "(each rank holds two of 2N equal chunks)")
    from fatrain.model import variant_settings

    variants = variant_settings(m.position, m.attn_softcap, m.attn_sinks)
    if variants:
        raise ValueError(f"{', '.join(variants.values())} is not supported with trainer.context_parallel={n} "
                         "(the ring's chunk calls and their backward take no attention variants)")
    if m.attn_dropout > 0:
        raise ValueError(f"model.attn_dropout={m.attn_dropout} is not supported with trainer.context_parallel={n} "
                         "(use 0)")
    info = backend_info(a.backend)
    if t.cp_strategy == "ring":
        if not info.supports("return_lse") or info.backward is None:
            have = [b for b in available_backends() if backend_info(b).supports("return_lse")
                    and backend_info(b).backward is not None]
            raise ValueError(f"trainer.cp_strategy=ring needs an attention backend that returns the logsumexp and "
                             f"exposes its backward; attention.backend={a.backend} does not (use one of: "
                             f"{', '.join(have)}, or trainer.cp_strategy=ulysses)")
    else:
        kv_heads = m.n_kv_head or m.n_head
        if m.n_head % n or kv_heads % n:
            raise ValueError(f"trainer.cp_strategy=ulysses shards heads: model.n_head={m.n_head} and its KV heads "
                             f"({kv_heads}) must be divisible by trainer.context_parallel={n}")


def check_world(n: int, world_size: int) -> None:
    if n > world_size or world_size % n:
        raise ValueError(f"trainer.context_parallel={n} must divide the number of ranks ({world_size}); the "
                         "data-parallel degree is ranks / context_parallel")


# ----- the load-balanced layout ------------------------------------------------------------------------


def rank_chunks(n: int, cp_rank: int) -> tuple[int, int]:
    """The two chunks (of 2N) that context rank ``cp_rank`` holds: i and 2N-1-i."""
    return cp_rank, 2 * n - 1 - cp_rank


def shard_index(seq_len: int, n: int, cp_rank: int, device=None) -> torch.Tensor:
    """Positions of the full sequence that rank ``cp_rank`` holds, in its local order."""
    c = seq_len // (2 * n)
    a, b = rank_chunks(n, cp_rank)
    return torch.cat((torch.arange(a * c, (a + 1) * c, device=device), torch.arange(b * c, (b + 1) * c, device=device)))


def pair_calls(qa: int, kb: int, c: int, batch: int, window_left: int, docs=None) -> list[tuple]:
    """The calls of query chunk ``qa`` against key chunk ``kb`` (chunk-local coordinates):
    tuples (b0, b1, q0, q1, k0, k1, causal, window_left, diagonal). ``docs``: the batch's
    document ids on the host ((B, seq_len) non-decreasing rows), or None without masking.

    A key j of chunk kb is visible to query i of chunk qa (causal, window W) when
    kb*C + j <= qa*C + i and qa*C + i - (kb*C + j) <= W; for kb < qa that is j >= i + m with
    m = (qa - kb) * C - W, a band the backend expresses as window (left, -1) once the rows
    that see nothing are sliced off.
    """
    if kb > qa:
        return []
    if kb == qa:
        return [(0, batch, 0, c, 0, c, True, window_left, True)]
    rects = []  # (b0, b1, q0, q1, k0, k1): the document that runs across both chunks
    if docs is None:
        rects.append((0, batch, 0, c, 0, c))
    else:
        for b in range(batch):
            dq, dk = docs[b, qa * c:(qa + 1) * c], docs[b, kb * c:(kb + 1) * c]
            if dk[-1] != dq[0]:
                continue
            rect = (0, int((dq == dq[0]).sum()), int(c - (dk == dk[-1]).sum()), c)
            if rects and rects[-1][2:] == rect and rects[-1][1] == b:
                rects[-1] = (rects[-1][0], b + 1, *rect)  # the same rectangle as the row before: one call
            else:
                rects.append((b, b + 1, *rect))
    calls = []
    for b0, b1, q0, q1, k0, k1 in rects:
        if window_left < 0:
            calls.append((b0, b1, q0, q1, k0, k1, False, -1, False))
            continue
        m = (qa - kb) * c - window_left
        if k1 - 1 < q0 + m:
            continue  # every query's window ends before these keys
        q1 = min(q1, k1 - m)  # later rows see no key of this chunk
        if k0 >= q1 - 1 + m:
            calls.append((b0, b1, q0, q1, k0, k1, False, -1, False))
        else:
            calls.append((b0, b1, q0, q1, k0, k1, False, k1 - q1 - m, False))
    return calls


# ----- the group ---------------------------------------------------------------------------------------


class ContextParallel:
    """This rank's place in the (data x context) mesh, and the attention that spans its context group."""

    def __init__(self, degree: int, strategy: str, *, mesh=None, rank: int = 0, world_size: int = 1):
        self.degree, self.strategy = degree, strategy
        self.mesh = mesh
        self.dp_size = world_size // degree
        self.dp_rank, self.cp_rank = divmod(rank, degree)
        self.group = mesh["cp"].get_group() if mesh is not None else None
        self.peers = [self.dp_rank * degree + i for i in range(degree)]  # global ranks of the context group
        self.doc_ids = None  # the full sequences' document ids of the batch in flight (shard_batch)
        self._docs_host = None
        self._calls = {}
        self.bytes_sent = 0  # K/V, dK/dV and all-to-all payload this rank sent (the communication model's count)

    # -- data -------------------------------------------------------------------------------------------
    def shard_batch(self, batch: dict, spec) -> dict:
        """The model inputs of this rank's shard: idx, targets, doc_ids and positions of the full sequence."""
        ids, labels, doc_ids = batch["input_ids"], batch["labels"], batch["doc_ids"]
        T = ids.shape[1]
        index = shard_index(T, self.degree, self.cp_rank, ids.device)
        from fatrain.model import positions_from_doc_ids

        positions = positions_from_doc_ids(doc_ids) if spec.rope_reset_per_document else \
            torch.arange(T, device=ids.device)
        positions = positions[..., index]
        self.set_documents(doc_ids if spec.document_masking else None)
        return {"idx": ids[:, index], "targets": labels[:, index], "doc_ids": doc_ids[:, index],
                "positions": positions}

    def set_documents(self, doc_ids: Optional[torch.Tensor]) -> None:
        """The full (B, seq_len) document ids the next forward and backward attend with (None: no masking)."""
        self.doc_ids, self._calls = doc_ids, {}
        self._docs_host = None
        if doc_ids is not None and self.strategy == "ring":
            host = doc_ids.cpu()
            if bool((host[:, 1:] < host[:, :-1]).any()):
                raise ValueError("context parallelism with data.document_masking needs non-decreasing document ids "
                                 "in each sequence (as the packer makes them)")
            self._docs_host = host

    def calls(self, qa: int, kb: int, c: int, batch: int, window_left: int) -> list[tuple]:
        key = (qa, kb, c, batch, window_left)
        if key not in self._calls:
            self._calls[key] = pair_calls(qa, kb, c, batch, window_left, self._docs_host)
        return self._calls[key]

    # -- the model --------------------------------------------------------------------------------------
    def install(self, model) -> None:
        """Route every block's attention through this group (the parameters are untouched)."""
        for block in model.blocks:
            block.attn.attn = functools.partial(context_attention, self, block.attn.spec.attention)

    # -- transport --------------------------------------------------------------------------------------
    def exchange(self, send: Optional[torch.Tensor], dst: int, recv_like: Optional[torch.Tensor], src: int,
                 tag: int = 0):
        """Start sending ``send`` to context rank ``dst`` and receiving a tensor shaped like ``recv_like``
        from context rank ``src`` (either may be None: nothing to send or to receive); returns (the
        receive buffer or None, requests to wait on). ``tag`` keeps K/V and dK/dV apart (gloo)."""
        ops, recv = [], None
        if send is not None:
            ops.append(dist.P2POp(dist.isend, send, self.peers[dst], self.group, tag))
            self.bytes_sent += send.numel() * send.element_size()
        if recv_like is not None:
            recv = torch.empty(recv_like.shape, dtype=recv_like.dtype, device=recv_like.device)
            ops.append(dist.P2POp(dist.irecv, recv, self.peers[src], self.group, tag))
        return recv, (dist.batch_isend_irecv(ops) if ops else [])

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """Part i of dim 0 to context rank i; dim 0 of the result: part from rank i."""
        x = x.contiguous()
        out = torch.empty_like(x)  # NOTE: after contiguous(): empty_like keeps a permuted tensor's strides
        dist.all_to_all_single(out, x, group=self.group)
        self.bytes_sent += x.numel() * x.element_size() * (self.degree - 1) // self.degree
        return out


def build_context_parallel(cfg, dist_env) -> Optional[ContextParallel]:
    """The mesh of ``trainer.context_parallel`` (None when it is 1: the plain data-parallel path)."""
    t = cfg.trainer
    n = t.context_parallel
    check_world(n, dist_env.world_size)
    if n == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(dist_env.device.type, (dist_env.world_size // n, n), mesh_dim_names=("dp", "cp"))
    return ContextParallel(n, t.cp_strategy, mesh=mesh, rank=dist_env.rank, world_size=dist_env.world_size)


# ----- attention ---------------------------------------------------------------------------------------


def context_attention(cp: ContextParallel, backend: str, q, k, v, *, causal: bool = True, window_size=(-1, -1),
                      doc_ids=None, dropout_p: float = 0.0, softmax_scale=None, **options):
    """The attention call of the registry over the whole sequence, for this rank's shard of Q, K, V."""
    if not causal:
        raise ValueError("context parallelism shards sequences for causal attention (causal=True)")
    if dropout_p > 0:
        raise ValueError("attention dropout is not supported with context parallelism")
    window_left = int(window_size[0])
    docs = cp.doc_ids if doc_ids is not None else None
    if cp.strategy == "ulysses":
        return ulysses_attention(cp, backend, q, k, v, window_left, docs, softmax_scale, options)
    return RingAttention.apply(q, k, v, cp, backend, window_left, docs, softmax_scale, options)


def _merge(out_acc, lse_acc, out_i, lse_i) -> None:
    """Fold one partial (out_i, lse_i) into the running (out_acc, lse_acc) in place (views of the accumulators)."""
    lse = torch.logaddexp(lse_acc, lse_i)
    w_acc = torch.exp(lse_acc - lse).transpose(1, 2)[..., None]
    w_i = torch.exp(lse_i - lse).transpose(1, 2)[..., None]
    out_acc.mul_(w_acc).add_(out_i.float() * w_i)
    lse_acc.copy_(lse)


def _ring_calls(cp: ContextParallel, src: int, c: int, batch: int, window_left: int, dst: Optional[int] = None):
    """The calls of context rank ``dst``'s queries (default: this rank's) against rank ``src``'s
    keys, in shard coordinates: (b0, b1, q rows, k rows, causal, window_left, the diagonal chunk
    or None). Empty when every pair is masked: then ``src`` sends ``dst`` nothing."""
    out = []
    for qi, qa in enumerate(rank_chunks(cp.degree, cp.cp_rank if dst is None else dst)):
        for ki, kb in enumerate(rank_chunks(cp.degree, src)):
            for b0, b1, q0, q1, k0, k1, causal, left, diagonal in cp.calls(qa, kb, c, batch, window_left):
                out.append((b0, b1, slice(qi * c + q0, qi * c + q1), slice(ki * c + k0, ki * c + k1), causal,
                            left, qa if diagonal else None))
    return out


def _wait(requests) -> None:
    for request in requests:
        request.wait()


class RingAttention(torch.autograd.Function):
    """Ring attention over the context group: Q stays, each rank's K/V shard visits the ranks that
    need it (step t: to rank r + t, from rank r - t), and in the backward its dK/dV share comes back.

    Step t of N is a shift of the ring by t: rank r attends to the shard of rank r - t. Each shard
    goes straight to the ranks whose queries see some of it (``_ring_calls`` is not empty; every
    rank computes that from the same chunk ids and document ids), so masked steps cost neither
    compute nor bytes; the next step's shard is in flight while the current one is computed.
    """

    @staticmethod
    def forward(ctx, q, k, v, cp, backend, window_left, docs, softmax_scale, options):
        from fatrain.kernels import get_backend

        attention = get_backend(backend)
        B, L, H, D = q.shape
        c = L // 2
        n, r = cp.degree, cp.cp_rank
        out_acc = torch.zeros(B, L, H, D, dtype=torch.float32, device=q.device)
        lse_acc = torch.full((B, H, L), float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.stack((k, v))

        def post(step):  # step's shards: ours to rank r + step, rank r - step's to us
            dst, src = (r + step) % n, (r - step) % n
            return cp.exchange(kv if _ring_calls(cp, r, c, B, window_left, dst=dst) else None, dst,
                               kv if _ring_calls(cp, src, c, B, window_left) else None, src)

        pending = post(1) if n > 1 else (None, [])
        for step in range(n):
            src = (r - step) % n
            block = kv
            if step > 0:
                block, requests = pending
                _wait(requests)
                pending = post(step + 1) if step + 1 < n else (None, [])
            if block is None:
                continue
            for b0, b1, qs, ks, causal, left, diagonal in _ring_calls(cp, src, c, B, window_left):
                call_docs = None if diagonal is None or docs is None else \
                    docs[b0:b1, diagonal * c:(diagonal + 1) * c]
                out_i, lse_i = attention(q[b0:b1, qs], block[0, b0:b1, ks], block[1, b0:b1, ks], causal=causal,
                                         window_size=(left, -1), doc_ids=call_docs, softmax_scale=softmax_scale,
                                         return_lse=True, **options)
                _merge(out_acc[b0:b1, qs], lse_acc[b0:b1, :, qs], out_i, lse_i)
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse_acc)
        ctx.setup = (cp, backend, window_left, docs, softmax_scale, options)
        return out

    @staticmethod
    def backward(ctx, dout):
        from fatrain.kernels import get_backward

        q, k, v, out, lse = ctx.saved_tensors
        cp, backend, window_left, docs, softmax_scale, options = ctx.setup
        attention_backward = get_backward(backend)
        B, L, H, D = q.shape
        c = L // 2
        n, r = cp.degree, cp.cp_rank
        dout = dout.contiguous()
        dq = torch.zeros(B, L, H, D, dtype=torch.float32, device=q.device)
        kv = torch.stack((k, v))
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)  # our shard's dK, dV from every rank

        def post(step):
            dst, src = (r + step) % n, (r - step) % n
            return cp.exchange(kv if _ring_calls(cp, r, c, B, window_left, dst=dst) else None, dst,
                               kv if _ring_calls(cp, src, c, B, window_left) else None, src)

        def shard_grads(block, src):
            """dQ into dq; this rank's share of dK, dV of rank ``src``'s shard (float32)."""
            part = torch.zeros(block.shape, dtype=torch.float32, device=q.device)
            for b0, b1, qs, ks, causal, left, diagonal in _ring_calls(cp, src, c, B, window_left):
                call_docs = None if diagonal is None or docs is None else \
                    docs[b0:b1, diagonal * c:(diagonal + 1) * c]
                dq_i, dk_i, dv_i = attention_backward(
                    dout[b0:b1, qs], q[b0:b1, qs], block[0, b0:b1, ks], block[1, b0:b1, ks], out[b0:b1, qs],
                    lse[b0:b1, :, qs], causal=causal, window_size=(left, -1), doc_ids=call_docs,
                    softmax_scale=softmax_scale, **options)
                dq[b0:b1, qs] += dq_i
                part[0, b0:b1, ks] += dk_i
                part[1, b0:b1, ks] += dv_i
            return part

        dkv += shard_grads(kv, r)
        pending = post(1) if n > 1 else (None, [])
        returning = (None, [])  # the share of dK/dV that rank r + step computed for our shard, in flight
        sent = []  # the shares sent back: alive until their requests were waited on (at the next step)
        for step in range(1, n):
            src, dst = (r - step) % n, (r + step) % n
            block, requests = pending
            _wait(requests)
            pending = post(step + 1) if step + 1 < n else (None, [])
            part = shard_grads(block, src) if block is not None else None
            received, requests = returning
            _wait(requests)
            if received is not None:
                dkv += received
            # Our share of src's dK/dV goes back to src; rank dst's share of ours comes in.
            returning = cp.exchange(part, src, dkv if _ring_calls(cp, r, c, B, window_left, dst=dst) else None,
                                    dst, tag=1)
            sent.append(part)
        received, requests = returning
        _wait(requests)
        if received is not None:
            dkv += received
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None, None


# ----- Ulysses: all-to-all over heads ------------------------------------------------------------------


def _shard_order(cp: ContextParallel, seq_len: int, device) -> torch.Tensor:
    """Full-sequence positions in the order the all-to-all gathers them (rank 0's shard, rank 1's, ...)."""
    return torch.cat([shard_index(seq_len, cp.degree, r, device) for r in range(cp.degree)])


def _seq_to_heads(cp: ContextParallel, x: torch.Tensor) -> torch.Tensor:
    """(B, L, H, D) sequence shard -> (B, N*L, H/N, D): the full sequence, in order, of this rank's heads."""
    B, L, H, D = x.shape
    n = cp.degree
    parts = x.view(B, L, n, H // n, D).permute(2, 0, 1, 3, 4)  # part i: head group i
    gathered = cp.all_to_all(parts).permute(1, 0, 2, 3, 4).reshape(B, n * L, H // n, D)
    order = _shard_order(cp, n * L, x.device)
    return gathered[:, torch.argsort(order)]


def _heads_to_seq(cp: ContextParallel, y: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_seq_to_heads`: (B, T, H/N, D) -> (B, T/N, H, D)."""
    B, T, h, D = y.shape
    n = cp.degree
    order = _shard_order(cp, T, y.device)
    parts = y[:, order].view(B, n, T // n, h, D).permute(1, 0, 2, 3, 4)  # part i: rank i's positions
    back = cp.all_to_all(parts)  # part i: head group i of this rank's positions
    return back.permute(1, 2, 0, 3, 4).reshape(B, T // n, n * h, D)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cp):
        ctx.cp = cp
        return _seq_to_heads(cp, x)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(ctx.cp, grad.contiguous()), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, cp):
        ctx.cp = cp
        return _heads_to_seq(cp, y)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(ctx.cp, grad.contiguous()), None


def ulysses_attention(cp: ContextParallel, backend: str, q, k, v, window_left: int, docs, softmax_scale, options):
    from fatrain.kernels import get_backend

    qh, kh, vh = (_SeqToHeads.apply(t, cp) for t in (q, k, v))
    y = get_backend(backend)(qh, kh, vh, causal=True, window_size=(window_left, -1), doc_ids=docs,
                             softmax_scale=softmax_scale, **options)
    return _HeadsToSeq.apply(y, cp)
