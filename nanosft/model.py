"""
The language model: token embedding -> n_layer decoder blocks -> final RMSNorm -> LM head.

    idx (B, T) -> x (B, T, C) -> blocks -> norm -> logits (B, T, vocab_size)

The layout and parameter names follow Hugging Face's LlamaForCausalLM (embed_tokens, layers.i.
self_attn.o_proj, mlp.down_proj, norm, lm_head), so a Llama-family checkpoint maps onto it name for
name, except that q/k/v and gate/up are stacked into one matrix each (qkv_proj, gate_up_proj: one
large matmul is faster than two or three small ones); checkpoint.py splits and stacks them.
Inputs besides the token ids:
  pos   (B, T) position of each token within its conversation (default 0..T-1)
  doc   (B, T) index of each token's conversation within a packed row; attention never crosses
        conversations (the block-causal "document mask"). None: one sequence per row.
  cache a KVCache: the tokens continue the cached ones (generation); or a SlotCache, whose rows
        each continue their own conversation (a server's continuous batching, engine.py).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from nanosft.attention import ATTEND, BlockwiseMask, KVCache, SlotCache, alibi_slopes
from nanosft.block import Block
from nanosft.embedding import Rotary, TokenEmbedding
from nanosft.fused_loss import linear_masked_nll
from nanosft.loss import masked_nll
from nanosft.norm import RMSNorm


POS_EMB = ("rope", "alibi", "none")
# From this vocabulary size on, the loss skips the logits (fused_loss.py), which are then the largest
# tensors of a step: a forward and backward of the default model shape measured 25% faster with
# 2,048 tokens, 2x with 8,192, but only 3-8% with the default 1,024, where the plain path (loss.py)
# is kept so that an edit to the loss takes effect in the default run.
FUSED_LOSS_VOCAB = 2048


@dataclass
class ModelConfig:
    vocab_size: int = 1024
    dim: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2  # key/value heads (grouped-query attention); 0: as many as n_head
    ffn_hidden: int = 0  # SwiGLU width; 0: 8/3 * dim rounded up to a multiple of 32, which keeps
    #                      the three-matrix MLP at the cost of the classic 4*dim two-matrix one
    max_seq_len: int = 256
    head_dim: int = 0  # 0: dim // n_head (some checkpoints use another size)
    rope_theta: float = 10000.0
    rope_scaling: dict = None  # Llama 3 style long-context scaling, see embedding.py
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2; Llama with attention_bias)
    o_bias: bool = False  # bias on the output projection (Llama with attention_bias)
    # attention and its variants (attention.py explains each)
    attn_impl: str = "sdpa"  # "sdpa" (fast) or "manual" (explicit math), or another name in ATTEND
    window: int = 0  # sliding window: a query sees itself and window - 1 tokens back (0: all)
    pos_emb: str = "rope"  # "rope", "alibi" or "none"
    qk_norm: bool = False  # RMSNorm on each head's q and k
    softcap: float = 0.0  # attention scores squashed into (-softcap, softcap) (0: off)

    def __post_init__(self):
        """Every rule a config must follow, checked here and nowhere else (train.py's flags and
        hf_config.py's config.json both end up here); the messages use the field names."""
        if min(self.vocab_size, self.max_seq_len, self.n_layer, self.n_head, self.dim) < 1:
            raise ValueError("vocab_size, max_seq_len, n_layer, n_head and dim must be at least 1")
        rope = self.pos_emb == "rope"
        if not self.head_dim:
            if self.dim % self.n_head or (rope and self.dim // self.n_head % 2):
                raise ValueError(f"dim {self.dim} must split into n_head {self.n_head} heads"
                                 + (" of an even size (RoPE rotates pairs)" if rope else ""))
            self.head_dim = self.dim // self.n_head
        if rope and self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even (RoPE rotates pairs)")
        if self.n_kv_head < 0:
            raise ValueError("n_kv_head must not be negative (0: as many as n_head)")
        self.n_kv_head = self.n_kv_head or self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} must be a multiple of the {self.n_kv_head} key/value heads of n_kv_head")
        if self.attn_impl not in ATTEND:
            raise ValueError(f"attn_impl {self.attn_impl!r} is not one of {sorted(ATTEND)} (attention.py's ATTEND)")
        if self.pos_emb not in POS_EMB:
            raise ValueError(f"pos_emb {self.pos_emb!r} is not one of {POS_EMB}")
        if self.window < 0 or self.softcap < 0:
            raise ValueError(f"window ({self.window}) and softcap ({self.softcap}) must be >= 0")
        if self.rope_scaling and self.rope_scaling.get("rope_type") != "llama3":
            raise ValueError(f"rope_scaling {self.rope_scaling} is not supported (only Llama 3's, see embedding.py)")
        if not self.ffn_hidden:
            self.ffn_hidden = math.ceil(8 * self.dim / 3 / 32) * 32


class LMHead(nn.Linear):
    """hidden states (B, T, C) -> logits (B, T, vocab_size). Given targets and a loss mask, instead
    the summed NLL of the supervised tokens and their count, without the logits (fused_loss.py):
    computed inside this module's forward because ZeRO-3 gathers a module's (sharded) weights
    around its forward only, and the fused loss reads the head's weight directly."""

    def forward(self, x, targets=None, loss_mask=None):
        if targets is None:
            return super().forward(x)
        return linear_masked_nll(x, self.weight, targets, loss_mask)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = TokenEmbedding(cfg.vocab_size, cfg.dim)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling) if cfg.pos_emb == "rope" else None
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = LMHead(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # one matrix reads and writes tokens
        # Activation checkpointing (train.py --gradient-checkpointing): keep only each block's input
        # during the forward pass and recompute the block in the backward pass. About a third more
        # compute for activation memory that no longer grows with depth.
        self.grad_checkpointing = False
        self.fused_loss = None  # None: by vocabulary size (FUSED_LOSS_VOCAB); True/False: always/never
        self.apply(self._init_weights)
        # the projections that write into the residual stream start smaller, so the stream's
        # variance does not grow with depth (GPT-2's scaled init)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / (2 * cfg.n_layer) ** 0.5)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    @torch.no_grad()
    def add_token_rows(self, first, end):
        """Tokens first..end-1 were just added to the vocabulary: give them embedding (and untied
        head) rows equal to the mean of rows 0..first-1, growing the matrices if needed. An average
        token, not noise, so the first steps stay calm. (A checkpoint may already have spare rows
        past its tokenizer; those are overwritten the same way.)"""
        def fill(w):  # (V, C) -> (max(V, end), C)
            w = torch.cat([w, w.new_zeros(max(end - w.size(0), 0), w.size(1))])
            w[first:end] = w[:first].mean(0)
            return nn.Parameter(w)
        self.embed_tokens.weight = fill(self.embed_tokens.weight)
        self.lm_head.weight = self.embed_tokens.weight if self.cfg.tie_embeddings else fill(self.lm_head.weight)
        n = self.embed_tokens.weight.size(0)
        self.embed_tokens.num_embeddings = self.lm_head.out_features = self.cfg.vocab_size = n

    def new_cache(self, batch=1, max_len=None, slots=False):
        """A KVCache of `batch` rows, or with slots=True a SlotCache of `batch` slots."""
        p = self.embed_tokens.weight
        return (SlotCache if slots else KVCache)(self.cfg.n_layer, batch, self.cfg.n_kv_head,
                                                 max_len or self.cfg.max_seq_len, self.cfg.head_dim, p.dtype, p.device)

    def forward(self, idx, pos=None, doc=None, cache=None, targets=None, loss_mask=None):
        """-> logits (B, T, vocab_size); with targets (B, T): (sum of NLL over the supervised tokens,
        their count), as loss.masked_nll would compute it from the logits. loss_mask (B, T) says which
        targets are supervised (default: all)."""
        h = self.hidden(idx, pos, doc, cache)  # (B, T, C)
        if targets is None:
            return self.lm_head(h)  # (B, T, vocab_size)
        if loss_mask is None:  # every target counts
            loss_mask = torch.ones_like(targets)
        fused = self.cfg.vocab_size >= FUSED_LOSS_VOCAB if self.fused_loss is None else self.fused_loss
        if fused:  # the same numbers (tests/test_fused_loss.py)
            return self.lm_head(h, targets, loss_mask)  # (sum NLL, count), no logits
        return masked_nll(self.lm_head(h), targets, loss_mask)  # (sum NLL, count)

    def hidden(self, idx, pos=None, doc=None, cache=None):
        """The last block's output after the final norm, (B, T, C): what the LM head reads (and a
        reward model's scalar head, reward.py)."""
        B, T = idx.shape
        if pos is None:  # after the cached tokens (each row's own, in a SlotCache), else from 0
            pos = (cache.positions(T) if cache is not None else torch.arange(T, device=idx.device)).expand(B, T)
        # ALiBi's slopes, made here in fp32 rather than kept in a buffer that bf16 training would round
        slopes = alibi_slopes(self.cfg.n_head) if self.cfg.pos_emb == "alibi" else None  # (H,)
        # what each query may see (conversation, window, ALiBi): without a cache a BlockwiseMask,
        # which builds it for a block of queries at a time; with one the cache's dense (B or 1,
        # 1 or H, T, cached + T) mask (None for plain causal attention with a KVCache)
        if cache is None:
            mask = BlockwiseMask(T, idx.device, doc, self.cfg.window, slopes)
        else:
            mask = cache.mask(T, doc, self.cfg.window, slopes)
        x = self.embed_tokens(idx)  # (B, T, C)
        cos, sin = self.rotary(pos, x.dtype) if self.rotary is not None else (None, None)  # (B, 1, T, hd) each
        for i, block in enumerate(self.layers):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)  # (B, T, C)
            else:
                x = block(x, cos, sin, mask, cache, layer=i)  # (B, T, C)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)  # (B, T, C)
