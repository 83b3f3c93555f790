"""fused_loss.py promises: the loss computed from the hidden states and the LM head's weight, with
no logits kept, is loss.masked_nll of the LM head's logits (PyTorch's F.cross_entropy), with the
same gradients, in any number of chunks, in fp64, under bf16 autocast and with bf16 weights."""

import torch
import torch.nn.functional as F

from nanosft.fused_loss import linear_masked_nll
from nanosft.loss import masked_nll


def hidden_batch(seed=0, B=3, T=11, C=16, V=29, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, C, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(V, C, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) < 0.6).long()
    return h, w, targets, mask


def ce_sum(h, w, targets, mask):
    """The reference: LM head, then F.cross_entropy summed over the supervised tokens."""
    return F.cross_entropy(h.flatten(0, 1) @ w.T, targets.masked_fill(mask == 0, -100).flatten(), reduction="sum")


def test_fused_loss_and_gradients_equal_lm_head_then_cross_entropy_in_any_number_of_chunks():
    h, w, targets, mask = hidden_batch()
    ref = ce_sum(h, w, targets, mask)
    g_ref = torch.autograd.grad(ref, [h, w])
    n_sup = int(mask.sum())
    for chunk_rows in (1, 4, n_sup - 1, n_sup, 1000):  # one row at a time, a ragged last chunk, one chunk
        total, count = linear_masked_nll(h, w, targets, mask, chunk_elems=chunk_rows * w.size(0), min_rows=1)
        assert count == n_sup
        torch.testing.assert_close(total, ref)
        for a, b in zip(torch.autograd.grad(total, [h, w]), g_ref):
            torch.testing.assert_close(a, b)


def test_fused_loss_scales_its_gradients_by_the_upstream_gradient():
    # train.py backpropagates sum * (micro-batches * ranks) / supervised tokens, not the sum itself
    h, w, targets, mask = hidden_batch(1)
    total, _ = linear_masked_nll(h, w, targets, mask)
    g = torch.autograd.grad(total * 0.37, [h, w])
    for a, b in zip(g, torch.autograd.grad(ce_sum(h, w, targets, mask) * 0.37, [h, w])):
        torch.testing.assert_close(a, b)


def test_fused_loss_with_nothing_supervised_is_zero_with_zero_gradients():
    h, w, targets, mask = hidden_batch(2)
    total, count = linear_masked_nll(h, w, targets, torch.zeros_like(mask))
    assert total.item() == 0.0 and count.item() == 0
    gh, gw = torch.autograd.grad(total, [h, w])
    assert gh.abs().sum() == 0 and gw.abs().sum() == 0


def test_fused_loss_under_bf16_autocast_matches_the_autocast_lm_head():
    # autocast runs the LM head in bf16 and cross-entropy in fp32; the fused loss does the same
    h, w, targets, mask = hidden_batch(3, B=4, T=32, C=64, V=300, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, _ = masked_nll(F.linear(h, w), targets, mask)
        total, _ = linear_masked_nll(h, w, targets, mask, chunk_elems=16 * 300, min_rows=1)
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, ref, rtol=1e-4, atol=1e-3)
    # bf16 gradients are approximations: the fused ones (rounded chunk by chunk) must be about as
    # close to the exact fp64 gradients as autocast's own
    exact, _ = masked_nll(h.double() @ w.double().T, targets, mask)
    for a, b, x in zip(torch.autograd.grad(total, [h, w]), torch.autograd.grad(ref, [h, w]),
                       torch.autograd.grad(exact, [h, w])):
        assert a.dtype == b.dtype == torch.float32
        assert (a - x).abs().max() <= 1.5 * (b - x).abs().max()


def test_fused_loss_without_grad_only_scores():
    h, w, targets, mask = hidden_batch(4)
    with torch.no_grad():
        total, _ = linear_masked_nll(h, w, targets, mask)
        ref = ce_sum(h, w, targets, mask)
    assert not total.requires_grad
    torch.testing.assert_close(total, ref)


def test_fused_loss_with_a_frozen_head_gives_the_hidden_states_their_gradient():
    h, w, targets, mask = hidden_batch(5)
    w.requires_grad_(False)
    total, _ = linear_masked_nll(h, w, targets, mask)
    gh, = torch.autograd.grad(total, [h])
    torch.testing.assert_close(gh, torch.autograd.grad(ce_sum(h, w, targets, mask), [h])[0])


def test_fused_loss_with_bf16_weights_matches_the_bf16_lm_head():
    # DeepSpeed's bf16 mode: weights and activations are bf16, no autocast; the head's matmuls run in
    # bf16 and the softmax in fp32, as masked_nll does with the head's bf16 logits
    h, w, targets, mask = hidden_batch(6, B=4, T=32, C=64, V=300, dtype=torch.float32)
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    total, _ = linear_masked_nll(hb, wb, targets, mask, chunk_elems=16 * 300, min_rows=1)
    ref, _ = masked_nll(hb @ wb.T, targets, mask)
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, ref, rtol=1e-4, atol=1e-3)
    exact = ce_sum(hb.double(), wb.double(), targets, mask)
    for a, b, x in zip(torch.autograd.grad(total, [hb, wb]), torch.autograd.grad(ref, [hb, wb]),
                       torch.autograd.grad(exact, [hb, wb])):
        assert a.dtype == b.dtype == torch.bfloat16
        assert (a.double() - x).abs().max() <= 1.5 * (b.double() - x).abs().max()
