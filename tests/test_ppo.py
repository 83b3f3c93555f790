"""ppo.py promises the arithmetic of PPO and GRPO over a reply's tokens: GAE equal to its definition
as a discounted sum of TD errors, a clipped surrogate that is the plain one at a rollout's first
update (ratio 1), a KL penalty that is 0 while the policy is the reference, group-relative
advantages, whitening over reply tokens only, and nothing at all from prompt or padding positions."""

import torch

from nanosft.ppo import (entropy, gae, group_advantages, kl_k3, masked_mean, policy_loss, token_rewards,
                         value_loss, whiten)

# two replies, of 4 and 2 tokens, right-padded to 4
MASK = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])


def gae_by_definition(rewards, values, n, gamma, lam):
    """A_t = sum over l of (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, V_n = 0:
    one row of n tokens, written out term by term."""
    v = list(values[:n]) + [0.0]
    delta = [rewards[t] + gamma * v[t + 1] - v[t] for t in range(n)]
    return [sum((gamma * lam) ** k * delta[t + k] for k in range(n - t)) for t in range(n)]


def test_gae_equals_the_discounted_sum_of_td_errors_and_returns_add_the_values():
    rewards = torch.tensor([[0.1, -0.2, 0.0, 1.5], [0.3, -0.7, 9.0, 9.0]])  # (the 9s: padding)
    values = torch.tensor([[0.5, 0.4, -0.1, 0.8], [0.2, 0.6, 5.0, 5.0]])
    for gamma, lam in ((1.0, 0.95), (0.9, 0.8), (1.0, 1.0)):
        adv, ret = gae(rewards * MASK, values, MASK, gamma, lam)
        for row, n in enumerate((4, 2)):
            want = gae_by_definition(rewards[row].tolist(), values[row].tolist(), n, gamma, lam)
            assert torch.allclose(adv[row, :n], torch.tensor(want), atol=1e-6)
            assert torch.allclose(ret[row, :n], adv[row, :n] + values[row, :n], atol=1e-6)
        assert (adv[1, 2:] == 0).all() and (ret[1, 2:] == 0).all()  # nothing on padding


def test_the_reward_is_the_kl_penalty_per_token_plus_the_clipped_score_at_the_last():
    logp = torch.tensor([[-1.0, -2.0, -0.5, -0.1], [-0.3, -0.2, -4.0, -4.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -0.3], [-0.3, -0.9, -1.0, -1.0]])
    r = token_rewards(logp, ref, torch.tensor([2.0, -30.0]), MASK, kl_coef=0.1, clip=5.0)
    want = torch.tensor([[-0.05, 0.1, 0.0, -0.02 + 2.0], [0.0, -0.07 - 5.0, 0.0, 0.0]])
    assert torch.allclose(r, want, atol=1e-6)


def test_the_kl_terms_are_zero_when_the_policy_is_the_reference():
    logp = torch.log_softmax(torch.randn(2, 4, 7), -1)[..., 0]
    assert (token_rewards(logp, logp, torch.zeros(2), MASK) == 0).all()
    assert (kl_k3(logp, logp) == 0).all()
    assert (kl_k3(logp, logp - 0.3) > 0).all() and (kl_k3(logp, logp + 0.3) > 0).all()  # never negative otherwise


def test_at_a_rollouts_first_update_the_ratio_is_one_and_clipping_changes_nothing():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7, requires_grad=True)
    logp = torch.log_softmax(logits, -1)[..., 3]  # (B, T) the taken token's log-probability
    adv = torch.randn(2, 4)
    loss, clipped = policy_loss(logp, logp.detach(), adv, MASK, clip=0.2)
    plain = masked_mean(-adv * torch.exp(logp - logp.detach()), MASK)
    assert clipped == 0.0 and torch.equal(loss, plain) and abs(loss.item() + masked_mean(adv, MASK).item()) < 1e-6
    g_loss, = torch.autograd.grad(loss, logits, retain_graph=True)
    g_plain, = torch.autograd.grad(plain, logits)
    assert torch.allclose(g_loss, g_plain) and g_loss.abs().sum() > 0


def test_the_clip_stops_a_ratio_past_one_plus_eps_from_pushing_further():
    old = torch.zeros(1, 2)
    logp = torch.tensor([[0.5, 0.0]], requires_grad=True)  # ratio e^0.5 = 1.65 on the first token
    loss, clipped = policy_loss(logp, old, torch.ones(1, 2), torch.ones(1, 2), clip=0.2)
    assert abs(loss.item() - (-(1.2 + 1.0) / 2)) < 1e-6 and clipped == 0.5
    g, = torch.autograd.grad(loss, logp)
    assert g[0, 0] == 0 and g[0, 1] != 0  # the clipped token no longer pulls


def test_the_value_loss_is_clipped_around_the_old_values():
    old, ret, mask = torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2)
    # V = 0.1 moved within the clip: plain squared error; V = 2 moved past it: the worse of the two
    assert abs(value_loss(torch.tensor([[0.1, 0.1]]), old, ret, mask).item() - 0.5 * 0.81) < 1e-6
    assert abs(value_loss(torch.tensor([[2.0, 2.0]]), old, ret, mask, clip=0.2).item() - 0.5 * 1.0) < 1e-6


def test_padding_contributes_nothing_to_any_loss_or_mean():
    torch.manual_seed(1)
    logp, old, adv, values, ret = (torch.randn(2, 4) for _ in range(5))
    logits = torch.randn(2, 4, 9)
    junk = lambda x: torch.where(MASK.bool().reshape(MASK.shape + (1,) * (x.dim() - 2)), x, torch.full_like(x, 1e3))  # noqa: E731
    assert torch.allclose(policy_loss(logp, old, adv, MASK)[0], policy_loss(junk(logp), junk(old), junk(adv), MASK)[0])
    assert torch.allclose(value_loss(values, old, ret, MASK), value_loss(junk(values), junk(old), junk(ret), MASK))
    assert torch.allclose(entropy(logits, MASK), entropy(junk(logits), MASK))


def test_entropy_is_torchs_categorical_entropy_averaged_over_reply_tokens():
    logits = torch.randn(2, 4, 9)
    want = torch.distributions.Categorical(logits=logits).entropy()  # (2, 4)
    assert torch.allclose(entropy(logits, MASK), (want * MASK).sum() / MASK.sum(), atol=1e-6)


def test_group_advantages_center_and_scale_each_prompts_replies():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # 2 prompts x 4 replies
    a = group_advantages(r, 4)
    assert torch.allclose(a[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-3)
    assert (a[4:] == 0).all()  # all replies alike: nothing to learn from this prompt


def test_whitening_gives_the_reply_tokens_mean_0_and_std_1_and_leaves_padding_0():
    adv = torch.tensor([[3.0, -1.0, 2.0, 0.5], [4.0, 1.0, 99.0, -99.0]])  # (the 99s are padding)
    w = whiten(adv, MASK)
    kept = adv[MASK.bool()]
    assert torch.allclose(w[MASK.bool()], (kept - kept.mean()) / kept.std(unbiased=False), atol=1e-5)
    assert (w[~MASK.bool()] == 0).all()
    # several ranks: the moments of all their tokens together, given
    assert torch.allclose(whiten(adv, MASK, (1.0, 4.0)), (adv - 1.0) / 2.0 * MASK, atol=1e-6)
