"""
Packing benchmark: real tokens per second when conversations are packed into full rows (nanosft)
against batches padded to their longest conversation (the default collator of transformers' and
TRL's trainers), on the default data and on a long-tailed length distribution.

    .venv/bin/python bench/padding.py [--data default,longtail] [--config tiny] [--dtype fp32]
                                      [--conversations N] [--batch 8] [--json out.json]

The same conversations, in the same shuffled order, go through three training loops (forward +
loss over the supervised tokens + backward + AdamW, the loop of bench/train_step.py):
  nanosft packed   full rows (257 tokens; --longtail-max + 1 for longtail) of several whole
                   conversations; attention stays inside each conversation (document mask) and
                   positions restart (pos), so each one trains as if alone. A batch holds as many
                   rows as make about the positions of an average padded batch.
  nanosft padded   --batch conversations per batch, right-padded to the longest (decomposes the
                   figure: how much is the model, how much is packing)
  hf padded        the same padded batches through LlamaForCausalLM with its attention_mask and
                   labels = -100 on prompt and padding
Before timing, the script checks that nanosft and transformers give the same loss on the first
padded batch. Reported: the share of computed positions that are padding, the optimizer steps each
way, and real (non-padding) tokens per second; padding computes nothing anyone learns from.
"default" renders data/train.jsonl (made by data/generate.py) with a tokenizer trained on it; "longtail" draws lengths from a log-normal with
median 150 tokens (a few percent over 1,000, capped at --longtail-max), the first 30-70% of each a
prompt, random ids.
"""

import argparse
import json
import os
import random
import statistics
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
from nanosft.data import load_conversations, pack, padding_fraction, render_conversations, to_batch  # noqa: E402
from nanosft.template import ChatTemplate  # noqa: E402
from nanosft.tokenizer import Tokenizer  # noqa: E402
from train_step import CONFIGS, DEVICE, build, check_same_loss, run_steps, sync  # noqa: E402


def default_samples(n, vocab_size, max_len):
    """(ids, mask) of the first n conversations of data/train.jsonl, tokenizer trained on them."""
    path = os.path.join(ROOT, "data", "train.jsonl")
    if not os.path.exists(path):
        sys.exit(f"error: {path} not found; make it with: .venv/bin/python data/generate.py")
    records = load_conversations(path)[0][:n]
    tok = Tokenizer.train([m["content"] for r in records for m in r["messages"]], vocab_size)
    tok = tok.with_control_tokens(Tokenizer.CHAT_TOKENS)
    samples, _ = render_conversations(records, ChatTemplate(tok), max_len)
    return samples, tok.vocab_size


def longtail_samples(n, vocab_size, max_len, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.exp(rng.normal(np.log(150), 1.0, n)).astype(int), 8, max_len)
    samples = []
    for L in lengths:
        ids = rng.integers(4, vocab_size, L).astype(np.int32)
        mask = np.zeros(L, dtype=np.int8)
        mask[int(L * rng.uniform(0.3, 0.7)):] = 1  # prompt, then the supervised reply
        samples.append((ids, mask))
    return samples


def padded_batches(samples, batch, pad_id):
    """Consecutive groups of `batch` conversations, right-padded to the longest of each group:
    (idx, targets, loss_mask, attention_mask), each (B, T)."""
    out = []
    for i in range(0, len(samples), batch):
        group = samples[i:i + batch]
        T = max(len(ids) for ids, _ in group) - 1
        idx = torch.full((len(group), T), pad_id)
        targets = torch.full((len(group), T), pad_id)
        loss_mask = torch.zeros(len(group), T, dtype=torch.long)
        attn = torch.zeros(len(group), T, dtype=torch.long)
        for r, (ids, mask) in enumerate(group):
            n = len(ids) - 1
            idx[r, :n] = torch.from_numpy(ids[:-1].astype(np.int64))
            targets[r, :n] = torch.from_numpy(ids[1:].astype(np.int64))
            loss_mask[r, :n] = torch.from_numpy(mask[1:].astype(np.int64))
            attn[r, :n] = 1
        out.append({"idx": idx, "targets": targets, "loss_mask": loss_mask, "attention_mask": attn})
    return out


def packed_batches(samples, row_len, rows_per_batch, pad_id):
    packed = pack(samples, row_len, pad_id)
    n = len(packed["ids"])
    return [to_batch(packed, slice(i, i + rows_per_batch)) for i in range(0, n, rows_per_batch)], padding_fraction(packed)


def step_ours(model, b):
    total, count = model(b["idx"], pos=b.get("pos"), doc=b.get("doc"), targets=b["targets"], loss_mask=b["loss_mask"])
    return total / count.clamp(min=1)


def step_hf(model, b):
    labels = b["targets"].masked_fill(b["loss_mask"] == 0, -100)
    return model(input_ids=b["idx"], attention_mask=b["attention_mask"], labels=labels, shift_labels=labels).loss


def measure(name, samples, args, vocab):
    real = sum(len(ids) - 1 for ids, _ in samples)  # input positions that hold a real token
    padded = padded_batches(samples, args.batch, pad_id=0)
    positions = sum(b["idx"].numel() for b in padded)
    pad_frac = 1 - real / positions
    # packed batches compute about as many positions as the padded ones do on average: the same
    # work and memory per optimizer step, which is what a user sizes a batch by
    rows_per_batch = max(1, round(positions / len(padded) / (args.row_len - 1)))
    packed, pack_frac = packed_batches(samples, args.row_len, rows_per_batch, pad_id=0)
    padded, packed = ([{k: v.to(DEVICE) for k, v in b.items()} for b in bs] for bs in (padded, packed))
    ours, hf = build(args.config, args.row_len, vocab=vocab)
    ours_padded, _ = build(args.config, args.row_len, vocab=vocab)
    bf16 = args.dtype == "bf16"
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
        l0, l1 = step_ours(ours_padded, padded[0]).item(), step_hf(hf, padded[0]).item()
    check_same_loss(l0, l1, bf16, f"{name}, first padded batch")
    sides = {"nanosft_packed": (ours, step_ours, packed), "nanosft_padded": (ours_padded, step_ours, padded),
             "hf_padded": (hf, step_hf, padded)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, (m, _, _) in sides.items()}
    for k, (m, fn, batches) in sides.items():  # warm-up on a few batches
        run_steps(m, fn, opts[k], batches, 2, bf16)
    seconds = {k: [] for k in sides}
    for _ in range(args.rounds):  # alternate, so that all see the same machine
        for k, (m, fn, batches) in sides.items():  # one pass over the batches, an optimizer step each
            sync()
            t0 = time.perf_counter()
            run_steps(m, fn, opts[k], batches, len(batches), bf16)
            seconds[k].append(time.perf_counter() - t0)
    tps = {k: real / statistics.median(s) for k, s in seconds.items()}
    lengths = sorted(len(ids) for ids, _ in samples)
    return {"data": name, "config": args.config, "dtype": args.dtype, "conversations": len(samples),
            "median_len": lengths[len(lengths) // 2], "max_len": lengths[-1],
            "over_1000": sum(n > 1000 for n in lengths), "real_tokens": real,
            "row_len": args.row_len, "rows_per_batch": rows_per_batch, "batch": args.batch,
            "padded_steps": len(padded), "packed_steps": len(packed), "initial_loss": l0,
            "packed_padding_fraction": pack_frac, "padded_padding_fraction": pad_frac,
            **{f"{k}_tokens_per_s": v for k, v in tps.items()},
            "ratio": tps["nanosft_packed"] / tps["hf_padded"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--data", default="default,longtail", help="default and/or longtail")
    p.add_argument("--config", default="tiny", choices=list(CONFIGS), help="model shape, as in train_step.py")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--conversations", type=int, default=0,
                   help="conversations per data set (default: 3000 default ones, 400 long-tailed ones)")
    p.add_argument("--batch", type=int, default=8, help="conversations per padded batch")
    p.add_argument("--longtail-max", type=int, default=2048, help="longest long-tailed conversation (and row length)")
    p.add_argument("--rounds", type=int, default=3, help="timed passes per side; the median is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the figures here")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    results = []
    for name in args.data.split(","):
        if name == "default":
            args.row_len = 257  # train.py's default rows
            samples, vocab = default_samples(args.conversations or 3000, 1024, args.row_len)
        elif name == "longtail":
            args.row_len = args.longtail_max + 1
            vocab = CONFIGS[args.config][3]
            samples = longtail_samples(args.conversations or 400, vocab, args.row_len, args.seed)
        else:
            p.error(f"unknown data {name!r}; choose default or longtail")
        random.Random(args.seed).shuffle(samples)
        results.append(measure(name, samples, args, vocab))
    print(f"model {args.config}, {args.dtype}, {torch.get_num_threads()} threads; real tokens per second "
          "(padding excluded), median of the rounds")
    print(f"\n{'data':9} {'convs':>5} {'median':>6} {'max':>5} {'>1000':>5}  {'padding: packed':>15} {'padded':>7}  "
          f"{'steps: packed':>13} {'padded':>6}  {'nanosft packed':>14} {'nanosft padded':>14} {'hf padded':>9}  ratio")
    for r in results:
        print(f"{r['data']:9} {r['conversations']:5} {r['median_len']:6} {r['max_len']:5} {r['over_1000']:5}  "
              f"{r['packed_padding_fraction']:15.1%} {r['padded_padding_fraction']:7.1%}  "
              f"{r['packed_steps']:13} {r['padded_steps']:6}  {r['nanosft_packed_tokens_per_s']:14,.0f} "
              f"{r['nanosft_padded_tokens_per_s']:14,.0f} {r['hf_padded_tokens_per_s']:9,.0f}  {r['ratio']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
