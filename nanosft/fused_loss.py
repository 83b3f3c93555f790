"""
The masked SFT loss of loss.py fused with the LM head: the same sums, computed from the final hidden
states and the head's weight without ever materialising the logits. An optimisation; a first read
can skip it (tests/test_fused_loss.py holds it equal to loss.masked_nll of the logits, gradients too).

    linear_masked_nll(h, weight, targets, loss_mask) == masked_nll(h @ weight.T, targets, loss_mask)

Only the supervised positions go through the LM head at all (in SFT most tokens are prompt), a
chunk of rows at a time, and the gradients are worked out in the same pass. The full (tokens,
vocab) logits, their fp32 copy and the log-softmax saved for backward never exist: with
vocabularies of 32k-150k those are the largest tensors of a training step. model.py uses it when
the vocabulary is large (Transformer.fused_loss).
"""

import torch


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i -log softmax(h_i @ weight.T)[target_i], rows taken `chunk` at a time.

    The backward pass needs d nll / d logits = softmax - onehot(target), which the forward pass has
    in hand, so the gradients of h and weight are computed right there (two more matmuls per chunk)
    and backward only scales them. Nothing of size (rows, vocab) outlives its chunk."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, need_grad):  # h (N, C), weight (V, C), targets (N,)
        # matmuls in autocast's dtype when it is on (as nn.Linear would), the softmax in fp32 or better
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        acc = torch.promote_types(dtype, torch.float32)
        need_h, need_w = need_grad and ctx.needs_input_grad[0], need_grad and ctx.needs_input_grad[1]
        w = weight.to(dtype)
        total = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None
        for i in range(0, h.size(0), chunk):
            hc, tc = h[i:i + chunk].to(dtype), targets[i:i + chunk, None]  # (n, C), (n, 1)
            logp = torch.log_softmax((hc @ w.T).to(acc), dim=-1)  # (n, V) log-probabilities
            total -= logp.gather(1, tc).sum()
            if need_h or need_w:
                g = logp.exp_()  # softmax, in place; minus onehot(target) below: d nll / d logits (n, V)
                g.scatter_add_(1, tc, torch.full(tc.shape, -1.0, dtype=acc, device=g.device))
                g = g.to(dtype)
                if need_h:
                    grad_h[i:i + chunk] = g @ w  # (n, C)
                if need_w:
                    grad_w += g.T @ hc  # (V, C), summed over the chunks in fp32 (or better)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need_w else None)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_total if grad_h is not None else None,
                grad_w * grad_total if grad_w is not None else None, None, None, None)


# Left out of torch.compile (train.py --compile): the number of supervised rows changes with every
# batch, so a compiled version would recompile again and again, for a few large matmuls that
# compilation cannot speed up anyway.
@torch.compiler.disable
def linear_masked_nll(h, weight, targets, loss_mask, chunk_elems=1 << 22, min_rows=256):
    """h (B, T, C) final hidden states, weight (V, C) the LM head, targets and loss_mask (B, T)
    -> (sum of NLL over supervised tokens, their count); masked_nll(h @ weight.T, ...) computes the
    same (rounded to fp32). A chunk holds about chunk_elems logits (16 MiB in fp32), but at least
    min_rows rows: with a large vocabulary, chunks of a few dozen rows would spend their time
    re-reading the weight and its gradient instead of multiplying."""
    keep = loss_mask.flatten().bool()  # (B*T,)
    rows = h.flatten(0, 1)[keep]  # (N, C) supervised positions only
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    chunk = max(min_rows, chunk_elems // weight.size(0))
    total = LinearCrossEntropy.apply(rows, weight, targets.flatten()[keep], chunk, need_grad)
    return total, keep.sum().to(total.dtype)
