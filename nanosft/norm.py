"""
RMSNorm: x / rms(x) * weight, the normalisation of the Llama family. The decoder blocks normalise
the input of each branch with it (block.py), the model its final hidden states (model.py), and
QK-norm each attention head's queries and keys (attention.py).

No mean subtraction and no bias, unlike LayerNorm: cheaper, and as good in practice.
"""

import torch
import torch.nn as nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight. No mean subtraction and no bias, unlike LayerNorm."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in at least fp32: squares of bf16 activations overflow their precision quickly
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)
