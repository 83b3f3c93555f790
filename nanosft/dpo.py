"""
DPO, Direct Preference Optimization (Rafailov et al., 2023): learn from pairs of replies to one
prompt, one preferred ("chosen", y_w) and one not ("rejected", y_l), with no reward model and no
reinforcement learning. The policy pi starts as the SFT model; a frozen copy of it is the
reference pi_ref. A reply's implicit reward is how much more likely the policy makes it than the
reference does:

    r(y) = beta * (log pi(y | x) - log pi_ref(y | x))
    loss = -log sigmoid(r(y_w) - r(y_l))

log pi(y | x) is the sum of the log-probabilities of the reply's tokens: the supervised tokens of
the SFT loss mask (template.py), the prompt left out. beta sets how far the policy may move from the
reference: small beta, large moves. At the start policy = reference, every reward is 0 and the loss
is ln 2. With label smoothing eps (conservative DPO: a share eps of the labels assumed flipped),
loss = -(1 - eps) log sigmoid(d) - eps log sigmoid(-d), d = r(y_w) - r(y_l).

The loss only asks for a margin: it is as happy to lower both replies' likelihood, the chosen one
less, as to raise the chosen one, and the probability taken from them goes to whatever else the
model could write. With alpha > 0 (RPO, Pang et al., 2024) the chosen reply's negative
log-likelihood per token is added, alpha * -log pi(y_w | x) / |y_w|: SFT on the chosen replies
alongside, which keeps them the model's answers. (TRL's rpo_alpha averages the same NLL over all
the batch's chosen tokens, so long replies weigh more there.)

    reply_logps(logits, targets, mask)            (B,) summed log-probabilities of each row's reply
    dpo_loss(pi_w, pi_l, ref_w, ref_l, beta, eps) -> (loss per pair, r(y_w), r(y_l))
    dpo_loss(..., rpo_alpha=a, chosen_tokens=n)   the same with the chosen reply's NLL added
"""

import torch
import torch.nn.functional as F


def reply_logps(logits, targets, mask):
    """logits (B, T, V), targets (B, T) (the row shifted by one), mask (B, T) 1 on the reply's tokens
    -> (B,) the sum over each row of log p(target) where mask is 1, in fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (logp * mask).sum(-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1, label_smoothing=0.0,
             rpo_alpha=0.0, chosen_tokens=None):
    """Summed reply log-probabilities (B,) of the policy and the reference -> (loss (B,), chosen
    rewards (B,), rejected rewards (B,)). The rewards carry no gradient: they are for the logs
    (rewards/chosen, rewards/rejected, their margin, and the share of pairs ranked right).
    chosen_tokens (B,): the chosen replies' supervised tokens, for rpo_alpha's NLL per token."""
    chosen = beta * (policy_chosen - ref_chosen)  # (B,)
    rejected = beta * (policy_rejected - ref_rejected)
    d = chosen - rejected
    loss = -(1 - label_smoothing) * F.logsigmoid(d) - label_smoothing * F.logsigmoid(-d)
    if rpo_alpha:
        loss = loss + rpo_alpha * -policy_chosen / chosen_tokens
    return loss, chosen.detach(), rejected.detach()
