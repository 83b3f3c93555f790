"""
train.py's reinforcement-learning stages, DeepSpeed-Chat's step 3 (ppo.py holds the arithmetic):

    --stage ppo    the actor (the policy being trained) answers prompts; the reward model scores each
                   reply, the reference (the frozen starting model) prices every token's drift, the
                   critic (a value head, started from the reward model) predicts the return: GAE, then
                   clipped updates of actor and critic
    --stage grpo   each prompt answered --group times; a program scores the replies (exact match with
                   the data's answer): no reward model, no critic; the KL to the reference in the loss

One training step is one rollout and --ppo-epochs passes over it:

    rollout(run, prompts, step)        the replies (sampled with the KV cache, the rollout's generator
                                       seeded by seed, step and rank: a resumed run draws the same)
                                       and what the models say of them now: -> an experience dict
    rl_step(run, prompts, step)        rollout, advantages, updates; -> the step's loss, counts, metrics
    answer_scores(run)                 (PPO, once) the reward model's mean and std on the data's own
                                       answers: each score is normalized by them

All per-token tensors are (N, L-1) over the targets of the rows ids (N, L): a row is the prompt, then
the reply (its stop token included when one was drawn), right-padded; `mask` is 1 on the reply's
targets only.
"""

import contextlib
import math
from collections import defaultdict

import deepspeed
import torch

from nanosft.distributed import all_sum
from nanosft.generate import sample_batch
from nanosft.preference import sft_nll, sft_tokens
from nanosft.ppo import (entropy, gae, group_advantages, kl_k3, masked_mean, policy_loss, token_logps,
                         token_rewards, value_loss, whiten)

STAGES = ("ppo", "grpo")
# What a step logs (monitor CSVs, TensorBoard) besides the loss
LOGGED = ("reward_mean", "reward_std", "kl", "reply_length", "entropy", "clip_fraction", "value_loss",
          "empty_replies")


def rows_of(prompts, replies, pad_id, device):
    """-> ids (N, L) right-padded with pad_id, mask (N, L-1) 1 where the target is a reply token,
    last (N,) the index of each row's last token (where a reward model reads)."""
    L = max(len(p) + len(r) for p, r in zip(prompts, replies))
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), L - 1)
    last = torch.zeros(len(prompts), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, replies)):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, len(p) - 1:len(p) + len(r) - 1] = 1  # targets len(p) .. the reply's last token
        last[i] = len(p) + len(r) - 1
    return ids.to(device), mask.to(device), last.to(device)


@torch.no_grad()
def sample_replies(engine, prompts, template, max_new_tokens, temperature, generator):
    """The policy's replies to prompts (lists of ids), prompts of one length decoded together. Under
    ZeRO-3 the weights are gathered for the duration. -> (replies, stopped) per prompt."""
    model = engine.module
    sharded = engine.zero_optimization_stage() == 3
    gathered = deepspeed.zero.GatheredParameters(list(model.parameters())) if sharded else contextlib.nullcontext()
    by_length = defaultdict(list)
    for i, p in enumerate(prompts):
        by_length[len(p)].append(i)
    replies, stopped = [None] * len(prompts), [False] * len(prompts)
    with gathered:
        model.eval()
        for _, rows in sorted(by_length.items()):
            out, done = sample_batch(model, [prompts[i] for i in rows], [max_new_tokens] * len(rows),
                                     template.stop_ids, template.tok.vocab_size, temperature, generator)
            for i, r, d in zip(rows, out, done):
                replies[i], stopped[i] = r, d
        model.train()
    return replies, stopped


def policy_logps(model, ids):
    """-> (logits (N, L-1, V), log-probabilities (N, L-1) of each row's next tokens)."""
    logits = model(ids[:, :-1])
    return logits, token_logps(logits, ids[:, 1:])


@torch.no_grad()
def answer_scores(run, n=512, batch=64):
    """-> (mean, std) of the reward model's scores of the data's own answers to its first n prompts,
    each written as the policy would write it (content and end token). PPO scores a reply
    (score - mean) / std (InstructGPT's normalization puts the demonstrations' mean at 0): the
    reward model's scale and offset are arbitrary (Bradley-Terry sees only differences), and
    --reward-clip, the critic's --clip-value and the KL price all assume rewards of order 1. A
    reward model whose scores run from -40 to +40 would otherwise have nearly every score clipped
    to +-5, right or wrong. Every rank scores the same prompts (ZeRO-3 needs their forwards in step)."""
    template, scores = run.template, []
    for i in range(0, min(n, len(run.prompts)), batch):
        chunk = run.prompts[i:min(i + batch, n)]
        replies = [template.render_reply(answer) for _, answer in chunk]
        ids, _, last = rows_of([p for p, _ in chunk], replies, template.pad, run.device)
        scores.append(run.reward(ids, last).float())
    scores = torch.cat(scores)
    if not torch.isfinite(scores).all():
        raise ValueError("non-finite reward(s) from the reward model on the data's answers; stopped before "
                         "training (the last checkpoint is intact)")
    std = scores.std(unbiased=False).item()
    return scores.mean().item(), std if std > 1e-6 else 1.0  # (one answer, or all scored alike: no scaling)


@torch.no_grad()
def rollout(run, prompts, step):
    """prompts: [(ids, answer)] of this rank's step. -> the experience: ids, mask, last, old and
    reference log-probabilities, values (ppo), the rewards (N,), replies' content lengths."""
    args, engine, template = run.args, run.engine, run.template
    group = args.group if args.stage == "grpo" else 1
    asked = [p for p, _ in prompts for _ in range(group)]  # a prompt's group side by side
    generator = torch.Generator(device=run.device).manual_seed(args.seed * 1_000_003 + step * 1009 + run.rank)
    replies, stopped = sample_replies(engine, asked, template, args.max_new_tokens, args.temperature, generator)
    ids, mask, last = rows_of(asked, replies, template.pad, run.device)
    x = {"ids": ids, "mask": mask, "last": last,
         "length": torch.tensor([len(r) - s for r, s in zip(replies, stopped)], dtype=torch.float, device=run.device)}
    engine.eval()
    x["old"] = policy_logps(engine, ids)[1]
    engine.train()
    x["ref"] = policy_logps(run.ref, ids)[1]
    if args.stage == "ppo":
        x["score"] = (run.reward(ids, last).float() - run.reward_norm[0]) / run.reward_norm[1]  # (N,)
        x["values"] = run.critic(ids)[:, :-1].float() * mask  # (N, L-1): V at each target's state
    else:  # exact match with the data's answer, as evaluation counts it
        answers = [a for _, a in prompts for _ in range(group)]
        texts = [template.tok.decode(r[:-1] if s else r) for r, s in zip(replies, stopped)]
        x["score"] = torch.tensor([float(t.strip() == a.strip()) for t, a in zip(texts, answers)], device=run.device)
    return x


def advantages(run, x):
    """PPO: per-token rewards (KL penalty, clipped score at the end) and GAE over the critic's
    values; GRPO: each reply's reward against its group's, on every token of it."""
    args = run.args
    if args.stage == "ppo":
        rewards = token_rewards(x["old"], x["ref"], x["score"], x["mask"], args.kl_coef, args.reward_clip)
        x["adv"], x["returns"] = gae(rewards, x["values"], x["mask"], args.gamma, args.lam)
        if args.whiten:  # over every rank's reply tokens: the update does not depend on how the batch is split
            adv, mask = x["adv"], x["mask"]
            s, s2, n = all_sum([(adv * mask).sum().item(), (adv ** 2 * mask).sum().item(), mask.sum().item()], run.device)
            mean = s / max(n, 1.0)
            x["adv"] = whiten(adv, mask, (mean, max(s2 / max(n, 1.0) - mean ** 2, 0.0)))
    else:
        x["adv"] = group_advantages(x["score"], args.group)[:, None] * x["mask"]


def rl_step(run, prompts, step, before_step=None, sft=None):
    """One rollout of this rank's prompts, then --ppo-epochs passes of updates, each pass an
    optimizer step over --grad-accum micro-batches. -> (mean policy loss, replies, tokens, token
    slots, the means LOGGED names, over all ranks). Non-finite rewards stop the run (every rank,
    before any update: the last checkpoint stays what it was). sft: --sft-data's micro-batches, one
    for each of the rollout's: their loss times --sft-coef joins the actor's (DeepSpeed-Chat's
    unsupervised term, InstructGPT's PPO-ptx), logged as sft_loss."""
    args, engine = run.args, run.engine
    x = rollout(run, prompts, step)
    n = len(x["ids"])
    bad, empty = all_sum([(~torch.isfinite(x["score"])).sum().item(), (x["length"] == 0).sum().item()], run.device)
    if bad:
        raise ValueError(f"step {step}: {int(bad)} non-finite reward(s) from the "
                         f"{'reward model' if args.stage == 'ppo' else 'reward'}; stopped before updating "
                         "(the last checkpoint is intact)")
    advantages(run, x)
    sums = defaultdict(float)
    total_n = all_sum([n], run.device)[0]
    skip = empty == total_n  # every reply empty: nothing to learn from, and no NaN from an empty mean
    micro = [slice(i, i + math.ceil(n / args.grad_accum)) for i in range(0, n, math.ceil(n / args.grad_accum))]
    n_sup = sft_tokens(sft, run.device) if sft else 0.0
    for epoch in range(0 if skip else args.ppo_epochs):
        for j, sl in enumerate(micro):
            mask = x["mask"][sl]
            logits, logp = policy_logps(engine, x["ids"][sl])
            loss, clipped = policy_loss(logp, x["old"][sl], x["adv"][sl], mask, args.clip)
            if args.stage == "grpo":
                loss = loss + args.kl_coef * masked_mean(kl_k3(logp, x["ref"][sl]), mask)
            total = loss
            if sft:
                nll = sft_nll(engine, sft[j], run.device)[0]
                total = loss + args.sft_coef * nll * (len(micro) * run.world) / max(n_sup, 1.0)
                sums["sft_nll"] += nll.item() / args.ppo_epochs
            engine.backward(total)
            if before_step and epoch == 0 and j == len(micro) - 1:
                before_step()
            engine.step()
            sums["loss"] += loss.item() / len(micro) / args.ppo_epochs
            sums["clip_fraction"] += clipped / len(micro) / args.ppo_epochs
            if epoch == 0:
                sums["entropy"] += entropy(logits.detach(), mask).item() / len(micro)
            if args.stage == "ppo":
                v = run.critic(x["ids"][sl])[:, :-1].float()
                vloss = value_loss(v, x["values"][sl], x["returns"][sl], mask, args.clip_value)
                run.critic.backward(vloss)
                run.critic.step()
                sums["value_loss"] += vloss.item() / len(micro) / args.ppo_epochs
    score, mask = x["score"], x["mask"]
    kl = ((x["old"] - x["ref"]) * mask).sum(-1)  # (N,) each reply's log pi - log pi_ref, summed
    world = run.world
    g = all_sum([sums["loss"], sums["clip_fraction"], sums["entropy"], sums["value_loss"], score.sum().item(),
                 (score ** 2).sum().item(), kl.sum().item(), x["length"].sum().item(),
                 (x["ids"] != run.template.pad).sum().item(), x["ids"].numel(), sums["sft_nll"]], run.device)
    mean = g[4] / total_n
    logged = {"reward_mean": mean, "reward_std": max(g[5] / total_n - mean ** 2, 0.0) ** 0.5, "kl": g[6] / total_n,
              "reply_length": g[7] / total_n, "entropy": g[2] / world, "clip_fraction": g[1] / world,
              "value_loss": g[3] / world, "empty_replies": empty}
    if args.stage != "ppo":
        logged.pop("value_loss")
    if sft:
        logged["sft_loss"] = g[10] / max(n_sup, 1.0)
    return g[0] / world, total_n, g[8], g[9], logged
