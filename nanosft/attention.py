"""
Causal multi-head self-attention with grouped key/value heads, and the KV cache for generation.

    x (B, T, C) -> q (B, n_head, T, hd), k and v (B, n_kv_head, T, hd) -> rotate q, k (RoPE)
      -> [KV cache: append k, v to the keys and values of earlier tokens]
      -> each query attends over the keys it may see -> (B, T, C) -> output projection

n_kv_head <= n_head: with n_kv_head < n_head (grouped-query attention, GQA) each group of
n_head / n_kv_head query heads shares one key/value head, which shrinks the KV cache by the same
factor. n_kv_head = 1 is multi-query attention; n_kv_head = n_head is classic multi-head.

Two interchangeable ways to compute the attention itself, chosen by `impl`:
  "manual": the explicit math (scores, mask, softmax, weighted sum); read this one, edit this one.
  "sdpa":   torch.nn.functional.scaled_dot_product_attention, the fused fast path.
The tests hold them to the same outputs and gradients.

Which keys a query may see is given by a boolean `mask` (True = may attend), built once per
forward by model.py and shared by all layers; mask=None means plain causal attention.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanosft.embedding import apply_rotary


def causal_mask(T, S, device, offset=0):
    """(T, S) bool: query i (at absolute position offset + i) may see key j iff j <= offset + i."""
    q = torch.arange(T, device=device)[:, None] + offset
    return torch.arange(S, device=device)[None, :] <= q


def repeat_kv(x, n_head):
    """(B, H_kv, S, hd) -> (B, n_head, S, hd): each key/value head copied for the n_head / H_kv
    query heads it serves (query head h reads kv head h // groups)."""
    return x.repeat_interleave(n_head // x.size(1), dim=1)


def attend_manual(q, k, v, mask=None):
    """q (B, H, T, hd), k and v (B, H_kv, S, hd), mask broadcastable to (B, H, T, S) -> (B, H, T, hd).
    Each key/value head serves H / H_kv query heads (grouped-query attention)."""
    k, v = repeat_kv(k, q.size(1)), repeat_kv(v, q.size(1))  # (B, H, S, hd)
    T, S = q.size(-2), k.size(-2)
    if mask is None:
        mask = causal_mask(T, S, q.device, offset=S - T)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, T, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    # softmax in at least fp32: in bf16 the normalising sum loses precision over long rows
    weights = F.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    weights = weights.to(q.dtype)  # (B, H, T, S), each row sums to 1
    return weights @ v  # (B, H, T, hd)


def attend_sdpa(q, k, v, mask=None):
    """Same contract as attend_manual, through PyTorch's fused kernel. Without a mask the kernel
    reads the grouped key/value heads in place (enable_gqa) instead of copying them per query head."""
    T, S = q.size(-2), k.size(-2)
    gqa = q.size(1) != k.size(1)
    if mask is None and T == 1:  # one new token (generation): it sees every key, nothing to mask
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if mask is None and T == S:  # plain causal
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if mask is None:
        # queries come after cached keys: is_causal would align them to the start, so spell it out
        mask = causal_mask(T, S, q.device, offset=S - T)
    # NOTE: with a mask (packed rows, prefill after a cache), CUDA's memory-efficient kernel does not
    # take grouped heads and enable_gqa would fall back to the slow math kernel: copy them instead
    return F.scaled_dot_product_attention(q, repeat_kv(k, q.size(1)), repeat_kv(v, q.size(1)), attn_mask=mask)


ATTEND = {"manual": attend_manual, "sdpa": attend_sdpa}


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated up to max_len.
    The model appends to it layer by layer, then advances `len` once per forward."""

    def __init__(self, n_layer, batch, n_kv_head, max_len, head_dim, dtype, device):
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.len = 0  # tokens already cached
        self.max_len = max_len

    def update(self, layer, k, v):
        """Store k, v (B, n_kv_head, T, hd) after the cached tokens; return all keys and values so far."""
        t0, t1 = self.len, self.len + k.size(2)
        if t1 > self.max_len:
            raise ValueError(f"KV cache full: {t1} tokens > max_len {self.max_len}")
        self.k[layer, :, :, t0:t1] = k
        self.v[layer, :, :, t0:t1] = v
        return self.k[layer, :, :, :t1], self.v[layer, :, :, :t1]  # (B, n_kv_head, t1, hd)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim, n_head, n_kv_head, impl="sdpa", head_dim=None, qkv_bias=False, o_bias=False):
        super().__init__()
        head_dim = head_dim or dim // n_head  # usually dim // n_head; some checkpoints differ
        assert n_head % n_kv_head == 0, f"n_head {n_head} is not a multiple of n_kv_head {n_kv_head}"
        assert impl in ATTEND, f"impl must be one of {list(ATTEND)}"
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.impl = impl
        # One matrix computes q, k and v (their rows stacked in that order): one big matmul instead
        # of three small ones. checkpoint.py splits it into Llama's q_proj/k_proj/v_proj and back.
        self.qkv_proj = nn.Linear(dim, (n_head + 2 * n_kv_head) * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_head * head_dim, dim, bias=o_bias)

    def forward(self, x, cos, sin, mask=None, cache=None, layer=0):
        B, T, _ = x.shape
        H, H_kv = self.n_head, self.n_kv_head
        qkv = self.qkv_proj(x).view(B, T, H + 2 * H_kv, self.head_dim).transpose(1, 2)  # (B, H + 2 H_kv, T, hd)
        qk = apply_rotary(qkv[:, :H + H_kv], cos, sin)  # q and k heads rotated together
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + H_kv:]  # (B, H, T, hd), (B, H_kv, T, hd) twice
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H_kv, S, hd) with S = cached + T
        y = ATTEND[self.impl](q, k, v, mask)  # (B, H, T, hd); each kv head serves H / H_kv query heads
        y = y.transpose(1, 2).reshape(B, T, H * self.head_dim)  # (B, T, C)
        return self.o_proj(y)
