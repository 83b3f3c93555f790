"""
The SFT loss: cross-entropy on supervised tokens only (the loss mask from template.py).

    loss = sum over supervised tokens of -log p(target)  /  number of supervised tokens

masked_nll returns the two parts separately because the right denominator is not always this
micro-batch's own count: with gradient accumulation and several ranks, train.py divides by the
supervised tokens of the whole global batch, so that every supervised token weighs the same however
the batch is split. A micro-batch with no supervised token contributes exactly 0 (never 0/0 = NaN).

model.py computes the loss this way from its logits. With a large vocabulary it can instead use
fused_loss.py, an optimisation that gives the same numbers without ever holding the logits.
"""

import torch
import torch.nn.functional as F


def masked_nll(logits, targets, loss_mask):
    """logits (B, T, V), targets (B, T), loss_mask (B, T) of 0/1 -> (sum of NLL, token count)."""
    # at least fp32 for the log-softmax: bf16 logits give visibly wrong losses near convergence
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")  # (B*T,)
    m = loss_mask.flatten().to(nll.dtype)
    return (nll * m).sum(), m.sum()


def masked_sft_loss(logits, targets, loss_mask):
    """Mean NLL over supervised tokens; 0 (with a zero gradient) when there are none."""
    total, count = masked_nll(logits, targets, loss_mask)
    return total / count.clamp(min=1)
