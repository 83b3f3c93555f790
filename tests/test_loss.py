"""loss.py promises: the masked SFT loss is exactly PyTorch's cross-entropy with the unsupervised
positions ignored, and a batch with nothing to supervise gives 0 with zero gradients, never NaN."""

import torch
import torch.nn.functional as F

from nanosft.loss import masked_nll, masked_sft_loss


def batch(seed=0, B=3, T=11, V=29):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) < 0.4).long()
    return logits, targets, mask


def test_masked_loss_equals_cross_entropy_with_ignore_index():
    for seed in range(5):
        logits, targets, mask = batch(seed)
        ref = F.cross_entropy(logits.flatten(0, 1), targets.masked_fill(mask == 0, -100).flatten(), ignore_index=-100)
        ours = masked_sft_loss(logits, targets, mask)
        torch.testing.assert_close(ours, ref)
        g_ours, = torch.autograd.grad(ours, logits)
        g_ref, = torch.autograd.grad(ref, logits)
        torch.testing.assert_close(g_ours, g_ref)


def test_sum_and_count_are_token_weighted_across_micro_batches():
    # two micro-batches with very different supervised counts: sum/count over both equals one
    # cross-entropy over their concatenation, not the mean of the two means
    (l1, t1, m1), (l2, t2, m2) = batch(1, B=1), batch(2, B=4)
    s1, c1 = masked_nll(l1, t1, m1)
    s2, c2 = masked_nll(l2, t2, m2)
    ref = F.cross_entropy(torch.cat([l1.flatten(0, 1), l2.flatten(0, 1)]),
                          torch.cat([t1.masked_fill(m1 == 0, -100).flatten(), t2.masked_fill(m2 == 0, -100).flatten()]))
    torch.testing.assert_close((s1 + s2) / (c1 + c2), ref)
    assert not torch.isclose((s1 / c1 + s2 / c2) / 2, ref)


def test_all_masked_batch_gives_zero_loss_and_zero_grad_not_nan():
    logits, targets, _ = batch()
    mask = torch.zeros_like(targets)
    loss = masked_sft_loss(logits, targets, mask)
    assert loss.item() == 0.0
    g, = torch.autograd.grad(loss, logits)
    assert torch.isfinite(g).all() and g.abs().sum() == 0
    # the reference divides 0 by 0
    assert torch.isnan(F.cross_entropy(logits.flatten(0, 1), targets.flatten().fill_(-100), ignore_index=-100))


def test_bf16_logits_are_scored_in_fp32():
    logits, targets, mask = batch(3)
    ours = masked_sft_loss(logits.bfloat16(), targets, mask)
    assert ours.dtype == torch.float32
    ref = F.cross_entropy(logits.bfloat16().float().flatten(0, 1), targets.masked_fill(mask == 0, -100).flatten())
    torch.testing.assert_close(ours, ref)
