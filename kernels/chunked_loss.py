"""The output projection and mean cross-entropy over chunks of tokens, never holding the full logits.

    loss = linear_cross_entropy(hidden, weight, targets, vocab_size, chunk_tokens)

At long contexts the logits, not attention, are the largest tensor of a step: 1M tokens x 50,304
vocabulary is 100 GB in bf16, and the float32 softmax of the loss as much again. Here the tokens
are taken ``chunk_tokens`` at a time:

    forward   logits_c = hidden_c @ weight[:vocab]^T      (the matmul dtype: autocast's, else hidden's)
              lse_c = logsumexp(logits_c) in float32 (float64 for float64 inputs);  loss += sum(lse_c - logits_c[target])
              keeps only lse (one float32 per token) besides the inputs
    backward  logits_c recomputed, P_c = exp(logits_c - lse_c), G_c = (P_c - onehot) * dloss / n_valid
              dhidden_c = G_c @ weight[:vocab];  dweight[:vocab] += G_c^T @ hidden_c (float32)

so at most one chunk's logits (and its float32 softmax) exist at a time, forward and backward: peak
extra memory is about chunk_tokens x vocab x (2 + 4 + 4) bytes instead of tokens x vocab x that.
The cost is a second output matmul (the recompute in the backward), as in FlashAttention's own
recompute. The numbers are those of ``F.cross_entropy(hidden @ weight[:vocab].T, targets)`` with
the logits in the matmul dtype and the softmax in float32, as the model's PyTorch path computes
them; targets equal to ``ignore_index`` add nothing and are not counted in the mean. Rows of
``weight`` past ``vocab_size`` (the model pads its head) stay out of the softmax and get zero
gradient. Pure PyTorch: the same code on the CPU and the GPU.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _matmul_dtype(hidden: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


class _LinearCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size, chunk, dtype):
        w = weight[:vocab_size].to(dtype)
        acc = torch.promote_types(dtype, torch.float32)  # the softmax's dtype: float32 (float64 inputs: float64)
        valid = targets != IGNORE_INDEX
        n_valid = valid.sum()
        lse = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            end = min(start + chunk, hidden.shape[0])
            logits = (hidden[start:end].to(dtype) @ w.T).to(acc)
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            t = targets[start:end]
            picked = logits.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
            total += torch.where(valid[start:end], lse[start:end] - picked, 0.0).sum()
        ctx.save_for_backward(hidden, weight, targets, lse, n_valid)
        ctx.vocab_size, ctx.chunk, ctx.dtype = vocab_size, chunk, dtype
        return total / n_valid

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse, n_valid = ctx.saved_tensors
        vocab, chunk, dtype = ctx.vocab_size, ctx.chunk, ctx.dtype
        w = weight[:vocab].to(dtype)
        acc = lse.dtype
        scale = (grad / n_valid).to(acc)
        dhidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        dweight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], chunk):
            end = min(start + chunk, hidden.shape[0])
            h = hidden[start:end].to(dtype)
            t = targets[start:end]
            probs = torch.exp((h @ w.T).to(acc) - lse[start:end, None])
            valid = t != IGNORE_INDEX
            # minus one at each valid row's target (a scatter, not boolean indexing: no host sync)
            probs.scatter_add_(1, t.clamp(min=0)[:, None], -valid[:, None].to(acc))
            g = (probs * torch.where(valid, scale, 0.0)[:, None]).to(dtype)
            if dhidden is not None:
                dhidden[start:end] = (g @ w).to(hidden.dtype)
            if dweight is not None:
                dweight[:vocab] += (g.T @ h).to(acc)
        return dhidden, None if dweight is None else dweight.to(weight.dtype), None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         vocab_size: int | None = None, chunk_tokens: int = 4096) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight[:vocab_size].T`` against ``targets``, computed
    ``chunk_tokens`` tokens at a time (see the module docstring).

    Arguments:
        hidden: (tokens, n_embd), or (batch, seqlen, n_embd) (flattened)
        weight: (rows >= vocab_size, n_embd), the output head (tied to the embedding or not)
        targets: (tokens,) or (batch, seqlen) int64 in [0, vocab_size), or -100 (ignored)
        vocab_size: the softmax's classes (default: every row of weight)
        chunk_tokens: tokens per chunk, > 0 (need not divide the token count)
    Returns: the scalar loss (float32; float64 for float64 inputs); gradients flow to hidden and weight.
    """
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    vocab_size = weight.shape[0] if vocab_size is None else vocab_size
    if not 0 < vocab_size <= weight.shape[0]:
        raise ValueError(f"vocab_size must be in 1..{weight.shape[0]} (the rows of weight), got {vocab_size}")
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    targets1 = targets.reshape(-1)
    if targets1.shape[0] != hidden2.shape[0]:
        raise ValueError(f"targets hold {targets1.shape[0]} tokens and hidden {hidden2.shape[0]}")
    return _LinearCrossEntropy.apply(hidden2, weight, targets1, vocab_size, chunk_tokens, _matmul_dtype(hidden))


__all__ = ["linear_cross_entropy", "IGNORE_INDEX"]
