"""
One decoder block, pre-norm (Llama layout):

    x = x + attention(rmsnorm(x))
    x = x + mlp(rmsnorm(x))         mlp = down( silu(gate(x)) * up(x) )     (SwiGLU)

Normalising the input of each branch (not the residual stream itself) keeps a clean identity path
from the embedding to the head, which is why deep pre-norm stacks train without warm-up tricks.
"""

import torch.nn as nn
import torch.nn.functional as F

from nanosft.attention import CausalSelfAttention
from nanosft.norm import RMSNorm


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        # gate and up in one matrix (gate rows first): one matmul instead of two; checkpoint.py
        # splits it into Llama's gate_proj/up_proj and back
        self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):  # (B, T, C) -> (B, T, hidden) -> (B, T, C)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, hidden) each
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = CausalSelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.ffn_hidden)

    def forward(self, x, cos, sin, mask=None, cache=None, layer=0):  # x (B, T, C)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x
