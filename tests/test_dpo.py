"""dpo.py promises: a reply's log-probability is the sum over its supervised tokens (the SFT loss
on that row, negated); at the start (policy = reference) every reward is 0 and the loss is ln 2;
the loss and its gradient are those of the paper's formula written out directly, also with label
smoothing and with RPO's NLL term on the chosen reply."""

import math

import torch

from nanosft.dpo import dpo_loss, reply_logps
from nanosft.loss import masked_nll
from nanosft.model import ModelConfig, Transformer


def batch(seed=0, B=4, T=12, V=50):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.arange(T) >= torch.randint(2, 8, (B, 1), generator=g)).long()  # a prompt, then the reply
    return torch.randn(B, T, V, generator=g), targets, mask


def test_a_reply_log_probability_is_minus_its_rows_sft_loss():
    logits, targets, mask = batch()
    got = reply_logps(logits, targets, mask)
    for b in range(len(got)):
        nll, n = masked_nll(logits[b:b + 1], targets[b:b + 1], mask[b:b + 1])
        torch.testing.assert_close(got[b], -nll, rtol=1e-6, atol=1e-5)


def test_at_the_start_every_reward_is_zero_and_the_loss_is_ln2():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layer=2, n_head=4, max_seq_len=16))
    reference = Transformer(ModelConfig(vocab_size=50, dim=32, n_layer=2, n_head=4, max_seq_len=16))
    reference.load_state_dict(model.state_dict())
    _, targets, mask = batch(T=12)
    idx = torch.cat([torch.zeros(4, 1, dtype=torch.long), targets[:, :-1]], 1)
    chosen, rejected = idx, idx.flip(0)
    lp = [reply_logps(m(x), torch.roll(x, -1, 1), mask) for m in (model, reference) for x in (chosen, rejected)]
    loss, r_w, r_l = dpo_loss(*lp, beta=0.1)
    assert torch.equal(r_w, torch.zeros(4)) and torch.equal(r_l, torch.zeros(4))
    torch.testing.assert_close(loss, torch.full((4,), math.log(2)))


def direct(logits_w, logits_l, ref_w, ref_l, targets_w, targets_l, mask_w, mask_l, beta, eps, alpha):
    """The paper's formula with nothing shared with dpo.py: probabilities as exp / sum, the
    sigmoid as 1 / (1 + exp(-z)); RPO's term as the mean NLL of the chosen reply's tokens."""
    def logp(logits, targets, mask):
        p = logits.exp() / logits.exp().sum(-1, keepdim=True)
        picked = torch.stack([p[b, t, targets[b, t]] for b in range(p.shape[0]) for t in range(p.shape[1])])
        return (picked.log().view(targets.shape) * mask).sum(-1)
    z = beta * ((logp(logits_w, targets_w, mask_w) - ref_w) - (logp(logits_l, targets_l, mask_l) - ref_l))
    sig = lambda v: 1 / (1 + torch.exp(-v))  # noqa: E731
    nll = torch.stack([-logp(logits_w[b:b + 1], targets_w[b:b + 1], mask_w[b:b + 1])[0] / mask_w[b].sum()
                       for b in range(len(z))])
    return (-(1 - eps) * torch.log(sig(z)) - eps * torch.log(sig(-z)) + alpha * nll).mean()


def test_the_loss_and_its_gradient_are_the_formulas():
    for eps, alpha in ((0.0, 0.0), (0.2, 0.0), (0.0, 1.0)):
        lw, tw, mw = batch(1)
        ll, tl, ml = batch(2)
        ref_w, ref_l = torch.randn(4, generator=torch.Generator().manual_seed(3)), torch.randn(4)
        a = [x.clone().double().requires_grad_() for x in (lw, ll)]
        b = [x.clone().double().requires_grad_() for x in (lw, ll)]
        loss, _, _ = dpo_loss(reply_logps(a[0], tw, mw).double(), reply_logps(a[1], tl, ml).double(),
                              ref_w.double(), ref_l.double(), beta=0.5, label_smoothing=eps, rpo_alpha=alpha,
                              chosen_tokens=mw.sum(-1))
        want = direct(b[0], b[1], ref_w.double(), ref_l.double(), tw, tl, mw, ml, 0.5, eps, alpha)
        loss.mean().backward()
        want.backward()
        torch.testing.assert_close(loss.mean().double(), want, rtol=1e-5, atol=1e-6)
        for x, y in zip(a, b):
            torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-6)
