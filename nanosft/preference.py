"""
train.py's preference stages, --stage reward (reward.py) and --stage dpo (dpo.py): what they do
with a batch of pairs (data.pair_batch: the B chosen rows, then the B rejected ones), the
reference log-probabilities DPO measures the policy against, and the metrics of held-out pairs.

    sides(model, batch, stage)           one forward over the 2B rows -> (chosen (B,), rejected (B,)):
                                         scores (reward) or summed reply log-probabilities (dpo)
    pair_loss(model, batch, stage, ...)  -> (loss per pair, chosen, rejected): the scores or DPO's
                                         implicit rewards, for the logs
    pair_step(engine, micro, ...)        forward, backward, optimizer step; -> the step's metrics
                                         (with `sft`: SFT micro-batches whose loss joins the pairs')
    reference_logps(model, samples, ...) (N, 2): every pair's log pi_ref, once, before training
    pair_sums(model, samples, ...)       held-out pairs: loss, ranked right, chosen, rejected
"""

import torch

from nanosft.data import pair_batch
from nanosft.distributed import all_sum
from nanosft.dpo import dpo_loss, reply_logps
from nanosft.reward import pairwise_loss

STAGES = ("reward", "dpo")
# What a step logs, TRL's names: the mean chosen and rejected reward, their margin, and the share of
# pairs the model ranks right. (A reward model's rewards are its scores.)
LOGGED = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def sides(model, batch, stage):
    """-> (chosen (B,), rejected (B,)) in fp32: a reward model's scores at each row's end token, or
    a policy's log-probability of each reply (its supervised tokens, the prompt left out)."""
    ids, B = batch["ids"], len(batch["index"])  # ids (2B, L)
    if stage == "reward":
        out = model(ids, batch["length"] - 1)  # (2B,)
    else:
        logits = model(ids[:, :-1])  # (2B, L-1, V): the row shifted by one, as in SFT
        out = reply_logps(logits, ids[:, 1:], batch["mask"][:, 1:])  # (2B,)
    return out[:B], out[B:]


def pair_loss(model, batch, stage, ref=None, settings=None):
    """-> (loss (B,), chosen (B,), rejected (B,)). settings: the loss's keyword arguments, pairwise_loss's
    {center} or dpo_loss's {beta, label_smoothing, rpo_alpha}. For --stage dpo, ref: reference_logps'
    (N, 2) table, or the frozen reference model itself (--reference live)."""
    chosen, rejected = sides(model, batch, stage)
    if stage == "reward":
        return pairwise_loss(chosen, rejected, **(settings or {})), chosen.detach(), rejected.detach()
    if isinstance(ref, torch.Tensor):
        ref_chosen, ref_rejected = ref[batch["index"]].unbind(-1)  # this batch's pairs' rows of the table
    else:
        with torch.no_grad():
            ref_chosen, ref_rejected = sides(ref, batch, "dpo")
    B = len(chosen)
    return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, **settings, chosen_tokens=batch["mask"][:B, 1:].sum(-1))


def pair_step(engine, micro, world, device, stage, ref=None, settings=None, before_step=None, sft=None, sft_coef=1.0):
    """Forward and backward over this rank's micro-batches of pairs, then the optimizer step (before
    which `before_step()` is called, if given). -> the global batch's mean loss, its pairs, real
    tokens and token slots computed (real + padding), and the means LOGGED names (with `sft`, and
    "sft_loss").

    sft: SFT micro-batches (data.Batches), one for each of `micro`: their loss, times sft_coef, is
    added to the pairs' (InstructGPT's "PPO-ptx" term, DeepSpeed-Chat's unsupervised loss): what
    SFT taught that the pairs do not ask for keeps being taught, instead of drifting.

    NOTE: every micro-batch of every rank holds the same number of pairs (data.PairBatches), so the
    mean over a micro-batch's pairs, which DeepSpeed then averages over micro-batches and ranks, is
    the mean over the global batch: every pair weighs the same. The SFT term is normalised by the
    global batch's supervised tokens, as train.py's train_step normalises SFT."""
    sums = torch.zeros(8, dtype=torch.float64)  # batch_sums' five, then tokens, slots (SFT rows' too), SFT NLL
    n_sup = sft_tokens(sft, device) if sft else 0.0
    for i, b in enumerate(micro):
        b = {k: v.to(device) for k, v in b.items()}
        loss, chosen, rejected = pair_loss(engine, b, stage, ref, settings)
        total = loss.mean()
        if sft:
            nll, tokens, slots = sft_nll(engine, sft[i], device)
            total = total + sft_coef * nll * (len(micro) * world) / max(n_sup, 1.0)
            sums[5:] += torch.tensor([tokens, slots, nll.item()], dtype=torch.float64)
        engine.backward(total)
        if before_step and i == len(micro) - 1:
            before_step()
        engine.step()  # only the last micro-batch's call steps the optimizer
        sums[:7] += torch.tensor(batch_sums(loss, chosen, rejected) + [b["length"].sum().item(), b["ids"].numel()],
                                 dtype=torch.float64)
    sums = sums.to(device)
    torch.distributed.all_reduce(sums)
    *pairs, tokens, slots, sft_sum = sums.tolist()
    m = pair_metrics_from(pairs)
    logged = dict(zip(LOGGED, (m["reward_chosen"], m["reward_rejected"], m["reward_margin"], m["pair_accuracy"])))
    if sft:
        logged["sft_loss"] = sft_sum / max(n_sup, 1.0)
    return m["pair_loss"], pairs[-1], tokens, slots, logged


def sft_tokens(sft, device):
    """The supervised tokens of a step's SFT micro-batches, all ranks': the SFT term's denominator."""
    return all_sum([sum(b["loss_mask"].sum() for b in sft)], device)[0]


def sft_nll(engine, batch, device):
    """One SFT micro-batch (data.Batches') -> (summed NLL of its supervised tokens, real tokens, token
    slots): the term --sft-data adds, here and in rlhf.py. Scaled by len(micro) * world / the
    step's supervised tokens, it is the mean NLL per supervised token once DeepSpeed has averaged."""
    b = {k: v.to(device) for k, v in batch.items()}
    nll, _ = engine(b["idx"], pos=b["pos"], doc=b["doc"], targets=b["targets"], loss_mask=b["loss_mask"])
    return nll, (b["doc"] >= 0).sum().item(), b["doc"].numel()


def batch_sums(loss, chosen, rejected):
    """A batch's (B,) losses and rewards -> [loss, ranked right, chosen, rejected, pairs], summed."""
    return [loss.sum().item(), (chosen > rejected).sum().item(), chosen.sum().item(), rejected.sum().item(),
            len(chosen)]


def rank_batches(n, rank, world, batch_size):
    """This rank's share of n pairs (every world-th) in batches -> [(indices, how many count)]. Every
    rank runs the same number of forwards (ZeRO-3 gathers each layer's weights collectively): a
    rank with fewer pairs repeats pair 0 in its last batch, uncounted."""
    mine = list(range(rank, n, world))
    per_rank = -(-n // world)
    mine += [0] * (per_rank - len(mine))
    real = len(range(rank, n, world))
    return [(mine[i:i + batch_size], max(min(batch_size, real - i), 0)) for i in range(0, per_rank, batch_size)]


@torch.no_grad()
def reference_logps(model, samples, pad_id, batch_size, rank, world, device):
    """-> (N, 2) fp32 on device: log pi_ref(chosen), log pi_ref(rejected) of every pair, as the
    model (the policy before its first step: DPO's reference) gives them now. Each rank computes
    its share and the ranks exchange them, so no second model sits in memory during training."""
    table = torch.zeros(len(samples), 2, dtype=torch.float64, device=device)
    for index, real in rank_batches(len(samples), rank, world, batch_size):
        b = {k: v.to(device) for k, v in pair_batch(samples, index, pad_id).items()}
        chosen, rejected = sides(model, b, "dpo")
        table[index[:real]] = torch.stack([chosen, rejected], -1)[:real].double()
    torch.distributed.all_reduce(table)  # each pair was filled in by one rank, zeros elsewhere
    return table.float()


@torch.no_grad()
def pair_sums(model, samples, pad_id, batch_size, rank, world, device, stage, ref=None, settings=None):
    """Held-out pairs, this rank's share -> sums [loss, ranked right, chosen, rejected, pairs] (the
    caller adds them over ranks and divides)."""
    sums = [0.0] * 5
    for index, real in rank_batches(len(samples), rank, world, batch_size):
        b = {k: v.to(device) for k, v in pair_batch(samples, index, pad_id).items()}
        sums = [a + v for a, v in zip(sums, batch_sums(*(t[:real] for t in pair_loss(model, b, stage, ref, settings))))]
    return sums


def pair_metrics_from(sums):
    """batch_sums added up (over batches and ranks) -> the means train.py logs and tables."""
    loss, right, chosen, rejected, n = sums
    n = max(n, 1)
    return {"pair_loss": loss / n, "pair_accuracy": right / n, "reward_chosen": chosen / n,
            "reward_rejected": rejected / n, "reward_margin": (chosen - rejected) / n}
