"""
Evaluation: validation loss and perplexity, and exact match of generated answers.

  val_loss = sum of NLL over all supervised tokens / number of supervised tokens, over the whole
             validation set (token-weighted: not a mean of per-batch means, which would let a
             batch with 3 supervised tokens weigh as much as one with 300)
  val_ppl  = exp(val_loss)
  exact_match: greedy answers to held-out prompts compared with the expected answer, per family
             and overall.

train.py calls these at the start and end of a run;

    python -m nanosft.evaluate --ckpt runs/latest --eval data/eval.jsonl

re-runs exact match on a saved run.
"""

import argparse
import math
from collections import defaultdict

import torch

from nanosft.checkpoint import load_model
from nanosft.data import check_prompt, load_jsonl, to_batch
from nanosft.generate import reply
from nanosft.loss import masked_nll
from nanosft.template import ChatTemplate


@torch.no_grad()
def validation_loss(model, packed, batch_size=16):
    """-> (sum of NLL, supervised token count) over all rows of a packed dict, for this rank."""
    total = count = 0.0
    dev = next(model.parameters()).device
    for i in range(0, len(packed["ids"]), batch_size):
        b = {k: v.to(dev) for k, v in to_batch(packed, slice(i, i + batch_size)).items()}
        logits = model(b["idx"], pos=b["pos"], doc=b["doc"])
        s, c = masked_nll(logits, b["targets"], b["loss_mask"])
        total, count = total + s.item(), count + c.item()
    return total, count


def loss_and_ppl(total, count):
    """Token-weighted loss and perplexity; NaN when there was nothing to score."""
    if count == 0:
        return float("nan"), float("nan")
    loss = total / count
    return loss, math.exp(min(loss, 50.0))


@torch.no_grad()
def exact_match(model, template, records, max_new_tokens=32):
    """records: {"family", "messages" (ending with a user turn), "answer"}.
    -> ({family: accuracy, ..., "overall": accuracy}, list of replies in order). A prompt too long
    for the model's context counts as a miss (its reply is None), never as a crash."""
    hits, totals, replies = defaultdict(int), defaultdict(int), []
    for r in records:
        try:
            out = reply(model, template, r["messages"], max_new_tokens)
        except ValueError:  # prompt does not fit in the context
            out = None
        replies.append(out)
        fam = r.get("family", "all")
        totals[fam] += 1
        hits[fam] += int(out is not None and out.strip() == r["answer"].strip())
    scores = {f: hits[f] / totals[f] for f in sorted(totals)}
    scores["overall"] = sum(hits.values()) / max(sum(totals.values()), 1)
    return scores, replies


def check_eval_record(rec):
    """Validator for load_jsonl: a prompt (messages ending with a user turn) and its "answer"."""
    reason = check_prompt(rec)
    if reason is None and not isinstance(rec.get("answer"), str):
        reason = 'missing "answer" (a string)'
    return reason


def format_scores(scores):
    return "  ".join(f"{k} {v:.1%}" for k, v in scores.items())


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="exact match of a trained run on held-out prompts")
    p.add_argument("--ckpt", default="runs/latest")
    p.add_argument("--eval", default="data/eval.jsonl")
    args = p.parse_args()
    model, tok = load_model(args.ckpt)
    scores, _ = exact_match(model, ChatTemplate(tok), load_jsonl(args.eval, check_eval_record))
    print(format_scores(scores))
