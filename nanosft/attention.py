"""
Causal self-attention, its variants, and the KV cache for generation. This is the one file to edit
for an attention experiment; docs/attention.md walks through it and adds a variant in three steps.

    x (B, T, C) -> q (B, H, T, hd), k and v (B, H_kv, T, hd)
      -> [QK-norm] -> [RoPE: rotate q and k by position]
      -> [KV cache: append k, v after the keys and values of earlier tokens]  (S keys in all)
      -> scores q.k / sqrt(hd) (B, H, T, S) -> [soft-cap] -> mask (causal, window, ALiBi) -> softmax
      -> weighted sum of v (B, H, T, hd) -> (B, T, C) -> output projection

The variants, each a ModelConfig field (VARIANTS at the bottom names the ones that
`train.py --attn NAME` and `python -m nanosft.compare` know):
  n_kv_head  key/value heads. n_head (or 0): classic multi-head (MHA). Fewer: grouped-query
             (GQA), where each group of n_head / n_kv_head query heads shares one key/value head,
             shrinking the KV cache by that factor. 1: multi-query (MQA).
  window     sliding-window (local) attention: a query sees itself and the window - 1 tokens
             before it, never further back (Mistral's convention). 0: no limit.
  pos_emb    how a query learns where keys are. "rope": q and k rotated by their positions
             (embedding.py), so q.k depends on their distance. "alibi": no rotation; each head
             subtracts slope * distance from its scores, a different slope per head. "none"
             (NoPE): nothing; the causal mask alone lets the model infer order.
  qk_norm    RMSNorm over each head's q and k (learned scale per channel) before the scores, as in
             Qwen3 and OLMo 2: the scores stay bounded however large the activations grow.
  softcap    scores squashed smoothly into (-softcap, softcap) by tanh before the softmax, as in
             Gemma 2. 0: off.
  attn_impl  the function that turns q, k, v and the mask into the output, a name in ATTEND:
             "manual", the explicit math (read this one, edit this one), or "sdpa", PyTorch's fused
             scaled_dot_product_attention. The tests hold the two to the same outputs and
             gradients. sdpa cannot soft-cap, so with softcap the manual path is used, with a notice.

What each query may see is `mask`, made once per forward by model.py and shared by all layers:
None for plain causal attention (the fused kernels need no tensor for that), a bool (B or 1, 1, T, S)
with True = may attend, or with ALiBi a float (B or 1, H, T, S) added to the scores: -inf where
hidden, -slope * distance elsewhere (attention_mask). In training it is a BlockwiseMask, which hands
the attention function the same mask a block of queries at a time, so long rows never hold a (T, T)
tensor.
"""

import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanosft.embedding import apply_rotary
from nanosft.norm import RMSNorm


# ---- masks: which keys each query sees, and ALiBi's distance penalty

def span_mask(q0, q1, k0, device, doc=None, window=0, slopes=None):
    """What the queries at positions q0..q1-1 may see of the keys at positions k0..q1-1 (positions
    in one row): key j iff j <= i, and with a window i - j < window, and in a packed row (doc (B, T):
    each token's conversation, -1 on padding) j in i's conversation (padding sees only itself). -> bool (1 or B, 1, q1 - q0, q1 - k0), True =
    may attend; with ALiBi's slopes (H,) a float (1 or B, H, q1 - q0, q1 - k0) added to the scores:
    -inf where hidden, -slope * distance elsewhere."""
    q = torch.arange(q0, q1, device=device)[:, None]  # (Tq, 1)
    k = torch.arange(k0, q1, device=device)[None, :]  # (1, S)
    mask = causal(q, k, window)[None, None]  # (1, 1, Tq, S)
    if doc is not None:
        dq, dk = doc[:, q0:q1, None], doc[:, None, k0:q1]  # (B, Tq, 1), (B, 1, S)
        same = (dq == dk) & (dq >= 0) | (q == k)  # padding (doc -1) sees only itself
        mask = mask & same[:, None]  # (B, 1, Tq, S)
    return mask if slopes is None else with_alibi(mask, q - k, slopes)  # (1 or B, H, Tq, S) with ALiBi


def causal(q, k, window=0):
    """Positions of queries and keys (broadcastable) -> bool: the key is at or before the query, and
    with a window fewer than `window` positions back."""
    mask = k <= q
    if window:
        mask &= q - k < window
    return mask


def with_alibi(mask, distance, slopes):
    """A bool mask (..., 1, Tq, S) and the query-key distances (..., Tq, S) -> ALiBi's float mask
    (..., H, Tq, S): -slope * distance where visible (far keys count less), -inf where hidden."""
    bias = -slopes.to(distance.device, torch.float32)[:, None, None] * distance.float()  # (..., H, Tq, S)
    return torch.where(mask, bias, float("-inf"))


def alibi_slopes(n_head):
    """ALiBi's slope per head: 2^(-8/n), 2^(-16/n), ..., 2^(-8) for n a power of two, so some heads
    look far back and some only nearby. For other head counts the paper takes the slopes of the
    largest power of two p at most n, then every other slope of 2p heads."""
    p = 2 ** math.floor(math.log2(n_head))
    slopes = [2 ** (-8 * (i + 1) / p) for i in range(p)]
    slopes += [2 ** (-8 * (i + 1) / (2 * p)) for i in range(0, 2 * (n_head - p), 2)]
    return torch.tensor(slopes)  # (n_head,)


def attention_mask(T, S, device, doc=None, window=0, slopes=None):
    """The whole mask of one forward: T queries, the last T of S positions (S > T when a KV cache
    holds the first S - T). -> None for plain causal attention, else span_mask's bool or float
    (B or 1, 1 or H, T, S). In training BlockwiseMask builds it a block of queries at a time instead;
    this dense one is its reference and serves generation."""
    if doc is None and not window and slopes is None:
        return None  # plain causal: the fused kernels need no tensor for it
    assert doc is None or S == T, "packed rows (doc) are for training; generation uses one sequence"
    return span_mask(S - T, S, 0, device, doc, window, slopes)


# ---- long rows: the mask a block of queries at a time

BLOCK = 512  # queries per block. A row of T <= BLOCK tokens is one block: exactly the dense mask
REACH = 2  # a block whose keys reach more than REACH x BLOCK back is recomputed in the backward pass


def kept_keys(T, block=None):
    """How many keys a query's mask row holds while it waits for the backward pass: T in one
    block, at most REACH x BLOCK in blocks (those reaching further back are recomputed instead)."""
    return min(T, REACH * (block or BLOCK))


class BlockwiseMask:
    """The mask of a training forward (rows of T tokens, no cache), never built whole: the dense
    (B, 1, T, T) mask of a long row is quadratic in T, though a query sees only its own
    conversation, or only its window. attend() runs attention one block of queries at a time, each
    block against the keys its queries can see at all: from the start of the earliest conversation
    among them (or the window's reach) to the block's end. Its small mask is span_mask's rows of the
    dense mask, cut to those keys, built at the first layer and shared by the others (except those
    of blocks recomputed in the backward pass). With short conversations this also skips most of
    the dense mask's work: keys before the block's earliest conversation are never scored."""

    def __init__(self, T, device, doc=None, window=0, slopes=None, block=None):
        self.device, self.doc, self.window = device, doc, window
        self.slopes = None if slopes is None else slopes.to(device, torch.float32)  # moved once, not per block
        self.block = block or BLOCK
        self.plain = doc is None and not window and slopes is None  # plain causal: no mask at all
        self.blocks = [(0, T, 0)] if T <= self.block or self.plain else block_plan(T, self.block, doc, window)
        self.masks = {}  # (q0, q1, k0) -> its mask, once built

    def attend(self, attend, q, k, v, softcap=0.0):
        """attend (an ATTEND function) one block at a time: q (B, H, T, hd), k, v (B, H_kv, T, hd)
        -> (B, H, T, hd), the same as attend with the dense mask."""
        if self.plain:
            return attend(q, k, v, None, softcap)  # the fused kernels' own causal attention
        if len(self.blocks) == 1:  # one mask for the whole row
            return self.attend_blocks(attend, q, k, v, softcap)
        return self.attend_long(attend, q, k, v, softcap)

    # Under torch.compile (--compile) the blocks' bounds, which change with every batch's
    # conversations, would be compiled into the graph as constants: a new graph every step
    @torch.compiler.disable
    def attend_long(self, attend, q, k, v, softcap):
        return self.attend_blocks(attend, q, k, v, softcap)

    def attend_blocks(self, attend, q, k, v, softcap):
        out = []
        for q0, q1, k0 in self.blocks:
            qb, kb, vb = q[:, :, q0:q1], k[:, :, k0:q1], v[:, :, k0:q1]
            if torch.is_grad_enabled() and q.requires_grad and q1 - k0 > REACH * self.block:
                # a block that reaches far back would keep its large mask (and, on the manual path,
                # its weights) until the backward pass, and those add up to T^2 / 2 over a long
                # conversation: recompute them in the backward pass instead (as flash attention does;
                # with --gradient-checkpointing such a block is then computed three times)
                out.append(checkpoint(self.recomputed, attend, softcap, q0, q1, k0, qb, kb, vb,
                                      use_reentrant=False, preserve_rng_state=False))
            else:
                if (q0, q1, k0) not in self.masks:
                    self.masks[q0, q1, k0] = self.mask(q0, q1, k0)
                out.append(attend(qb, kb, vb, self.masks[q0, q1, k0], softcap))  # (B, H, q1 - q0, hd)
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)  # (B, H, T, hd)

    def recomputed(self, attend, softcap, q0, q1, k0, q, k, v):
        """One block, its mask built afresh (in the forward pass and again in the backward pass)."""
        return attend(q, k, v, self.mask(q0, q1, k0), softcap)

    def mask(self, q0, q1, k0):
        """The dense mask's rows q0..q1-1, columns k0..q1-1."""
        return span_mask(q0, q1, k0, self.device, self.doc, self.window, self.slopes)


@torch.compiler.disable  # (see attend_long)
def block_plan(T, block, doc=None, window=0):
    """-> [(q0, q1, k0), ...]: each block of `block` queries, and the first key any of them sees:
    where the earliest of their conversations begins (doc (B, T); conversations are contiguous in
    a row), or the window's reach if that is later."""
    starts = list(range(0, T, block))  # each block's first query
    first = [0] * len(starts)
    if doc is not None:
        pos = torch.arange(T, device=doc.device).expand_as(doc)
        begins = torch.ones_like(doc, dtype=torch.bool)
        begins[:, 1:] = doc[:, 1:] != doc[:, :-1]
        begins |= doc < 0  # padding (-1) sees only itself: a long padded tail reaches nowhere back
        first_of = torch.where(begins, pos, 0).cummax(dim=1).values  # (B, T): where each token's conversation begins
        # over the rows, at the block's first query (the earliest); read back to Python: one sync per forward
        first = first_of[:, starts].amin(0).tolist()
    if window:
        first = [max(f, q0 - window + 1) for f, q0 in zip(first, starts)]
    return [(q0, min(q0 + block, T), k0) for q0, k0 in zip(starts, first)]


# ---- the attention computation itself: q, k, v and the mask -> output

def repeat_kv(x, n_head):
    """(B, H_kv, S, hd) -> (B, n_head, S, hd): each key/value head copied for the n_head / H_kv
    query heads it serves (query head h reads kv head h // groups)."""
    return x.repeat_interleave(n_head // x.size(1), dim=1)


def attention_scores(q, k, softcap=0.0):
    """q (B, H, T, hd), k (B, H, S, hd) -> scores (B, H, T, S): how well each query matches each key.
    In at least fp32 from here on: in bf16 the softmax's normalising sum, and ALiBi's penalties at
    large distances, lose precision."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, T, S)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)  # in (-softcap, softcap); ~unchanged near 0
    return scores


def masked_softmax(scores, mask=None):
    """scores (B, H, T, S) -> weights (B, H, T, S): each query's row sums to 1 over the keys the mask
    lets it see. mask None: causal, the T queries being the last T of the S positions."""
    if mask is None:
        T, S = scores.shape[-2:]
        mask = span_mask(S - T, S, 0, scores.device)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask  # -inf where hidden, ALiBi's penalty elsewhere
    return F.softmax(scores, dim=-1)


def attend_manual(q, k, v, mask=None, softcap=0.0):
    """q (B, H, T, hd), k and v (B, H_kv, S, hd), mask None, bool or float (see the docstring)
    -> (B, H, T, hd). Each key/value head serves H / H_kv query heads (grouped-query attention)."""
    k, v = repeat_kv(k, q.size(1)), repeat_kv(v, q.size(1))  # (B, H, S, hd)
    weights = masked_softmax(attention_scores(q, k, softcap), mask)  # (B, H, T, S)
    return weights.to(q.dtype) @ v  # (B, H, T, hd)


def attend_sdpa(q, k, v, mask=None, softcap=0.0):
    """Same contract as attend_manual, through PyTorch's fused kernel. Without a mask the kernel
    reads the grouped key/value heads in place (enable_gqa) instead of copying them per query head."""
    assert not softcap, "sdpa cannot soft-cap scores; CausalSelfAttention uses the manual path for it"
    T, S = q.size(-2), k.size(-2)
    gqa = q.size(1) != k.size(1)
    if mask is None and T == 1:  # one new token (generation): it sees every key, nothing to mask
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if mask is None and T == S:  # plain causal
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if mask is None:
        # queries come after cached keys: is_causal would align them to the start, so spell it out
        mask = span_mask(S - T, S, 0, q.device)
    if mask.is_floating_point():
        mask = mask.to(q.dtype)  # an additive mask in the dtype of q, which every backend accepts
    if gqa and q.device.type == "cpu" and not q.requires_grad:
        # decoding on a CPU (a server's batch of rows of different lengths): the kernel takes a mask
        # and grouped heads together, 3x faster than copying the heads for a step of 16 rows
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    # NOTE: with a mask (packed rows, prefill after a cache), CUDA's memory-efficient kernel does not
    # take grouped heads and enable_gqa would fall back to the slow math kernel: copy them instead
    return F.scaled_dot_product_attention(q, repeat_kv(k, q.size(1)), repeat_kv(v, q.size(1)), attn_mask=mask)


# Every function here takes (q, k, v, mask=None, softcap=0.0) and returns (B, H, T, hd).
ATTEND = {"manual": attend_manual, "sdpa": attend_sdpa}


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated up to max_len.
    All rows hold the same number of tokens. The model asks it where the new tokens sit (positions)
    and what they may see (mask), appends to it layer by layer, then advances `len` once per forward."""

    def __init__(self, n_layer, batch, n_kv_head, max_len, head_dim, dtype, device):
        shape = (batch, n_kv_head, max_len, head_dim)  # one tensor per layer: a list lookup is
        # cheaper than slicing a layer out of one big tensor, twice per layer at every token
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.len = 0  # tokens already cached
        self.max_len, self.device = max_len, device

    def positions(self, T):
        """-> (1, T) the positions of T new tokens: right after the cached ones."""
        return torch.arange(self.len, self.len + T, device=self.device)[None]

    def mask(self, T, doc=None, window=0, slopes=None):
        """What T new tokens may see of the cached ones and of each other (attention_mask)."""
        return attention_mask(T, self.len + T, self.device, doc, window, slopes)

    def update(self, layer, k, v):
        """Store k, v (B, n_kv_head, T, hd) after the cached tokens; return all keys and values so far."""
        t0, t1 = self.len, self.len + k.size(2)
        if t1 > self.max_len:
            raise ValueError(f"KV cache full: {t1} tokens > max_len {self.max_len}")
        K, V = self.k[layer], self.v[layer]
        K[:, :, t0:t1] = k
        V[:, :, t0:t1] = v
        return K[:, :, :t1], V[:, :, :t1]  # (B, n_kv_head, t1, hd)

    def advance(self, T):
        self.len += T


class SlotCache:
    """The KV cache of a server that decodes many conversations at once (engine.py's continuous
    batching): `slots` rows, each holding one conversation of its own length. A forward runs on the
    rows that use(rows) names, in that order: one conversation's prompt (prefill), or one new token
    for each of several conversations (a decode step). Each row's new tokens sit at that row's own
    positions, and see only its own keys: those past a row's length (stale keys of an earlier
    conversation, or nothing yet) are hidden by the causal mask, since they lie after the query."""

    def __init__(self, n_layer, slots, n_kv_head, max_len, head_dim, dtype, device):
        shape = (slots, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.lens = [0] * slots  # tokens held by each slot
        self.max_len, self.device = max_len, device

    def use(self, rows):
        """The slots the next forward runs on: its batch row i is slot rows[i]."""
        self.rows = torch.tensor(rows, dtype=torch.long, device=self.device)  # (B,)
        # consecutive slots (the usual case: the engine fills the lowest free slots first) are read
        # as a slice, a view; others are gathered, a copy of their keys and values per layer
        consecutive = list(rows) == list(range(rows[0], rows[0] + len(rows)))
        self.read = slice(rows[0], rows[0] + len(rows)) if consecutive else self.rows
        self.start = torch.tensor([self.lens[r] for r in rows], dtype=torch.long, device=self.device)  # (B,)
        self.longest = max(self.lens[r] for r in rows)

    def positions(self, T):
        """-> (B, T) each row's new tokens, after its own cached ones."""
        return self.start[:, None] + torch.arange(T, device=self.device)  # (B, T)

    def mask(self, T, doc=None, window=0, slopes=None):
        """-> bool (B, 1, T, S), or with ALiBi's slopes float (B, H, T, S): query i of a row sees
        that row's keys at positions <= its own (and within the window), S = longest row + T."""
        assert doc is None, "a slot holds one conversation"
        q = self.positions(T)[:, None, :, None]  # (B, 1, T, 1)
        k = torch.arange(self.longest + T, device=self.device)  # (S,)
        mask = causal(q, k, window)  # (B, 1, T, S)
        return mask if slopes is None else with_alibi(mask, q - k, slopes)  # (B, H, T, S) with ALiBi

    def update(self, layer, k, v):
        """Store k, v (B, n_kv_head, T, hd) at each row's positions; -> the rows' keys and values
        (B, n_kv_head, S, hd), S = longest row + T (shorter rows padded with keys their mask hides)."""
        S = self.longest + k.size(2)
        if S > self.max_len:
            raise ValueError(f"KV cache full: {S} tokens > max_len {self.max_len}")
        K, V, pos = self.k[layer], self.v[layer], self.positions(k.size(2))  # pos (B, T)
        rows = self.rows[:, None]  # (B, 1) against pos (B, T): the (B, T) cells to write
        K[rows, :, pos] = k.transpose(1, 2)  # (B, T, n_kv_head, hd)
        V[rows, :, pos] = v.transpose(1, 2)
        return K[self.read, :, :S], V[self.read, :, :S]

    def advance(self, T):
        for r in self.rows.tolist():
            self.lens[r] += T


NOTICED = set()  # fallbacks already announced: one line per process, not one per layer


def pick_impl(impl, softcap):
    """The name in ATTEND to use: `impl`, unless it is the fused kernel and the config soft-caps."""
    if softcap and impl == "sdpa":
        if impl not in NOTICED:
            print(f"attention: {impl} cannot soft-cap scores, using the manual path", file=sys.stderr)
            NOTICED.add(impl)
        return "manual"
    return impl


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        H, H_kv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim  # (ModelConfig checked that they fit together)
        self.n_head, self.n_kv_head, self.head_dim = H, H_kv, hd
        self.impl = pick_impl(cfg.attn_impl, cfg.softcap)
        self.softcap = cfg.softcap
        # One matrix computes q, k and v (their rows stacked in that order): one big matmul instead
        # of three small ones. checkpoint.py splits it into Llama's q_proj/k_proj/v_proj and back.
        self.qkv_proj = nn.Linear(cfg.dim, (H + 2 * H_kv) * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * hd, cfg.dim, bias=cfg.o_bias)
        if cfg.qk_norm:  # a learned scale per channel, shared by all heads (Qwen3's q_norm, k_norm)
            self.q_norm = RMSNorm(hd, cfg.norm_eps)
            self.k_norm = RMSNorm(hd, cfg.norm_eps)

    def forward(self, x, cos, sin, mask=None, cache=None, layer=0):
        """x (B, T, C); cos, sin (B, 1, T, hd) from the Rotary module, or None without RoPE."""
        B, T, _ = x.shape
        H, H_kv = self.n_head, self.n_kv_head
        qkv = self.qkv_proj(x).view(B, T, H + 2 * H_kv, self.head_dim).transpose(1, 2)  # (B, H + 2 H_kv, T, hd)
        qk, v = qkv[:, :H + H_kv], qkv[:, H + H_kv:]  # q and k heads (B, H + H_kv, T, hd); v (B, H_kv, T, hd)
        if hasattr(self, "q_norm"):
            qk = torch.cat([self.q_norm(qk[:, :H]), self.k_norm(qk[:, H:])], dim=1)
        if cos is not None:
            qk = apply_rotary(qk, cos, sin)  # q and k heads rotated together
        q, k = qk[:, :H], qk[:, H:]  # (B, H, T, hd), (B, H_kv, T, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H_kv, S, hd) with S = cached + T
        if isinstance(mask, BlockwiseMask):
            y = mask.attend(ATTEND[self.impl], q, k, v, self.softcap)  # (B, H, T, hd)
        else:
            y = ATTEND[self.impl](q, k, v, mask, self.softcap)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, H * self.head_dim)  # (B, T, H * hd): the heads side by side
        return self.o_proj(y)


# Named variants: ModelConfig fields to set, for `train.py --attn NAME` and `python -m nanosft.compare`.
# gqa's 2 key/value heads serve pairs of query heads with the default 4 heads.
VARIANTS = {
    "mha": dict(n_kv_head=0),  # 0: as many as the query heads
    "gqa": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "window": dict(window=16),
    "alibi": dict(pos_emb="alibi"),
    "nope": dict(pos_emb="none"),
    "qknorm": dict(qk_norm=True),
    "softcap": dict(softcap=5.0),
}
