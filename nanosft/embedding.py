"""
Embeddings: token ids -> vectors, and rotary position embedding (RoPE) for queries and keys.

RoPE encodes a token's position by rotating pairs of channels of q and k by an angle proportional
to the position, so that q.k depends only on the distance between two tokens. We follow the
Llama / Hugging Face layout ("rotate half": channel i pairs with channel i + head_dim/2), which is
what lets Llama checkpoints load without permuting their weights.

Positions are passed in explicitly rather than assumed to be 0..T-1: packed rows restart positions
for every conversation, and during generation the KV cache starts new tokens where it left off.
"""

import math

import torch
import torch.nn as nn


class TokenEmbedding(nn.Embedding):
    """A plain lookup table (vocab_size, dim). Its own class so a reader finds it by name."""


def llama3_scaled(inv_freq, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings, **_):
    """Llama 3's long-context RoPE: slow rotations (long wavelengths, which the original context
    never completed) are slowed down `factor` times more, fast ones are kept, and the band between
    is interpolated smoothly."""
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = original_max_position_embeddings / low_freq_factor  # longer than this: scale
    high_wavelen = original_max_position_embeddings / high_freq_factor  # shorter than this: keep
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mixed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelen > low_wavelen, inv_freq / factor, torch.where(wavelen < high_wavelen, inv_freq, mixed))


class Rotary(nn.Module):
    def __init__(self, head_dim, theta=10000.0, scaling=None):
        super().__init__()  # (head_dim is even and scaling Llama 3's: ModelConfig checks both)
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        if scaling:
            inv_freq = llama3_scaled(inv_freq, **{k: v for k, v in scaling.items() if k != "rope_type"})
        # persistent=False: derived from the config, never saved; also kept in fp32 on purpose,
        # as bf16 angles lose whole radians at large positions
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, pos, dtype):
        """pos (B, T) int -> cos, sin each (B, 1, T, head_dim), ready to broadcast over heads."""
        angles = pos[:, None, :, None] * self.inv_freq.float()  # (B, 1, T, head_dim/2), fp32 (int * fp32)
        angles = torch.cat((angles, angles), dim=-1)  # (B, 1, T, head_dim)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    """x (B, n_head, T, head_dim) rotated by the angles in cos/sin."""
    return x * cos + rotate_half(x) * sin
