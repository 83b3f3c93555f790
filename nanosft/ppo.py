"""
PPO for language models, DeepSpeed-Chat's step 3 (Ouyang et al., 2022), and GRPO beside it
(Shao et al., 2024). The policy (actor) writes a reply to each prompt; every reply token is an
action. All tensors here are (B, T) over a row's target positions, with `mask` 1 on the reply's
tokens (its end token included) and 0 on the prompt and padding: neither gets a loss or a reward.

Rewards. The reward model scores the whole reply once; that score, clipped, is the reward of the
reply's last token. Every token also pays for moving away from the reference (the frozen SFT
model), so that the policy cannot drift into text the reward model was never shown:

    r_t = -kl_coef * (log pi(a_t) - log pi_ref(a_t))   (+ clip(score) at the last token)

Advantages (GAE, Schulman et al., 2016). The critic predicts V_t, the return expected from token t
on. With delta_t = r_t + gamma * V_{t+1} - V_t (V past the last token is 0: the episode ends),

    A_t = delta_t + gamma * lam * A_{t+1}          returns_t = A_t + V_t (the critic's target)

Losses. ratio = pi(a_t) / pi_old(a_t), pi_old the policy that wrote the replies. The clipped
surrogate takes the worse of the plain and the clipped ratio, so one rollout cannot push the policy
far; at the first update after a rollout ratio = 1 and the two are equal. The critic's loss is
clipped the same way around its old values.

    policy   = mean over reply tokens of max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))
    value    = 0.5 * mean of max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2)

GRPO needs no critic and no reward model: each prompt is answered G times, a program scores each
reply (here: exact match with a known answer), and a reply's advantage is its reward against its
group's, the same for every token of it: A = (r - mean_group) / (std_group + 1e-4). The KL to the
reference goes into the loss instead of the reward, as the k3 estimator
exp(ref - logp) - (ref - logp) - 1 (unbiased, never negative).

    token_logps(logits, targets)                               (B, T) log pi of the tokens taken
    token_rewards(logp, ref_logp, score, mask, kl_coef, clip)  (B, T)
    gae(rewards, values, mask, gamma, lam)                     -> advantages, returns (B, T)
    policy_loss(logp, old_logp, advantages, mask, clip)        -> loss, clip fraction
    value_loss(values, old_values, returns, mask, clip)        -> loss
    group_advantages(rewards, group)                           (N,) -> (N,)
    kl_k3(logp, ref_logp)                                      (B, T) per-token KL estimate
    masked_mean(x, mask), entropy(logits, mask)
"""

import torch


def token_logps(logits, targets):
    """logits (B, T, V), targets (B, T) -> (B, T) log pi of each target token, in fp32."""
    return torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def masked_mean(x, mask):
    """The mean of x over the positions where mask is 1 (0 when there are none)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def last_index(mask):
    """mask (B, T) -> (B,) the position of each row's last 1 (its reply's last token)."""
    return (mask * torch.arange(1, mask.shape[1] + 1, device=mask.device)).argmax(-1)


def token_rewards(logp, ref_logp, score, mask, kl_coef=0.1, clip=5.0):
    """(B, T) log-probabilities of the taken tokens under the policy and the reference, score (B,)
    the reward model's, mask (B, T) -> (B, T) per-token rewards: the KL penalty on every reply
    token, the clipped score added at each row's last one; 0 on padding."""
    rewards = -kl_coef * (logp - ref_logp) * mask
    at_end = torch.zeros_like(rewards).scatter(1, last_index(mask)[:, None], score.clamp(-clip, clip)[:, None].to(rewards.dtype))
    return rewards + at_end * mask


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """rewards, values, mask (B, T) -> (advantages, returns), each (B, T) and 0 on padding. Runs
    backwards over the positions, all rows at once; past a row's last token the value is 0 and
    nothing flows back from the padding."""
    T = rewards.shape[1]
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # A_{t+1}, per row
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def whiten(x, mask, moments=None):
    """x (B, T) -> shifted and scaled to mean 0 and std 1 over the positions where mask is 1, 0
    elsewhere: advantages on one scale whatever the reward model's (the returns keep theirs).
    moments: (mean, variance) to use instead of x's own (those of every rank's x together)."""
    if moments is None:
        mean = masked_mean(x, mask)
        moments = (mean, masked_mean((x - mean) ** 2, mask))
    mean, var = moments
    return (x - mean) * (var + 1e-8) ** -0.5 * mask


def policy_loss(logp, old_logp, advantages, mask, clip=0.2):
    """-> (PPO's clipped surrogate loss, the share of reply tokens whose ratio the clip cut)."""
    ratio = torch.exp(logp - old_logp)  # (B, T)
    plain, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(plain, clipped), mask)
    return loss, masked_mean((clipped > plain).float(), mask).item()


def value_loss(values, old_values, returns, mask, clip=0.2):
    """The critic's clipped squared error against the returns (B, T)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def group_advantages(rewards, group):
    """rewards (N,) of N = prompts x group replies, each prompt's replies side by side -> (N,)
    advantages: each reward against its group's mean, in units of its group's std."""
    r = rewards.view(-1, group)
    return ((r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True, unbiased=False) + 1e-4)).flatten()


def kl_k3(logp, ref_logp):
    """(B, T) -> (B, T): an estimate of KL(pi || pi_ref) per token from the sampled token alone
    (Schulman's k3): exp(d) - d - 1, d = ref_logp - logp, never negative."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def entropy(logits, mask):
    """logits (B, T, V) at the reply's positions -> the mean entropy of the policy per reply token."""
    logp = torch.log_softmax(logits.float(), -1)
    return masked_mean(-(logp.exp() * logp).sum(-1), mask)
