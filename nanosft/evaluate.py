"""
Evaluation: did the model learn? Two kinds of numbers.

  Validation loss and perplexity, over the supervised tokens of held-out conversations:
      val_loss = sum of NLL over all supervised tokens / number of supervised tokens
      val_ppl  = exp(val_loss)
    token-weighted over the whole set (all batches, all ranks), not a mean of per-batch means,
    which would let a batch with 3 supervised tokens weigh as much as one with 300.
  Generation metrics: greedy replies to held-out prompts against their reference answers:
      exact_match  the share of replies equal to the reference (stripped), per family and overall
      bleu         corpus BLEU of the replies against the references, 0-100 (bleu.py), with
                   sacrebleu's 13a tokenization, or its 'zh' one when a reference contains Chinese

train.py evaluates the model at step 0 and after training (and the loss every --eval-every
steps), and prints the before/after table and a few sample conversations that this file formats.
On a saved run:

    python -m nanosft.evaluate --ckpt runs/latest --data data/eval.jsonl [--quantize int8|int4]

where --data holds prompts with an "answer" (data/eval.jsonl) or conversations in any training
format, whose last assistant turn is then the reference answer. It prints the table and can write
the numbers as JSON (--json).
"""

import argparse
import json
import math
import os
import sys
import unicodedata
from collections import defaultdict

import torch

from nanosft.bleu import corpus_bleu, pick_tokenizer
from nanosft.checkpoint import describe_path, load_model
from nanosft.data import check_conversation, check_prompt, pack, read_file, render_conversations, to_batch
from nanosft.files import read_json
from nanosft.formats import FORMATS, FormatError, to_messages
from nanosft.generate import greedy_batch
from nanosft.machine import decoding_threads, why_threads
from nanosft.quantize import QUANTIZE, quantize_model
from nanosft.template import ChatTemplate


# -----------------------------------------------------------------------------
# validation loss

@torch.no_grad()
def validation_loss(model, packed, batch_size=16):
    """-> (sum of NLL, supervised token count) over all rows of a packed dict, for this rank.
    Sums, not a mean: the caller adds them up over ranks before dividing."""
    total = count = 0.0
    dev = next(model.parameters()).device
    for i in range(0, len(packed["ids"]), batch_size):
        b = {k: v.to(dev) for k, v in to_batch(packed, slice(i, i + batch_size)).items()}
        s, c = model(b["idx"], pos=b["pos"], doc=b["doc"], targets=b["targets"], loss_mask=b["loss_mask"])
        total, count = total + s.item(), count + c.item()
    return total, count


def loss_and_ppl(total, count):
    """Token-weighted loss and perplexity; NaN when there was nothing to score."""
    if count == 0:
        return float("nan"), float("nan")
    loss = total / count
    return loss, math.exp(min(loss, 50.0))  # capped: an untrained model's exp() must not overflow


# -----------------------------------------------------------------------------
# generation metrics

def check_eval_record(rec):
    """Validator for held-out prompts: messages ending with a user turn, and the "answer"."""
    reason = check_prompt(rec)
    if reason is None and not isinstance(rec.get("answer"), str):
        reason = 'missing "answer" (a string)'
    if reason is None and not isinstance(rec.get("family", "all"), str):
        reason = '"family" must be a string (a name the scores are grouped by)'
    return reason


def load_held_out(path, fmt="auto"):
    """Held-out prompts with their reference answers -> records {"family", "messages" (ending
    with a user turn), "answer"}. A line is either such a record (data/eval.jsonl) or a
    conversation in any training format, split before its last assistant turn."""
    def convert(rec):
        if isinstance(rec, dict) and "answer" in rec:
            return rec
        msgs, _ = to_messages(rec, fmt)
        reason = check_conversation({"messages": msgs})
        if reason:
            raise FormatError(reason)
        return {"family": rec.get("family", "all"), "messages": msgs[:-1], "answer": msgs[-1]["content"]}
    return read_file(path, check_eval_record, convert)[0]


@torch.no_grad()
def generation_metrics(model, template, records, max_new_tokens=None):
    """Greedy replies to held-out prompts, scored against the references ->
    ({"exact_match": {family: share, ..., "overall": share}, "bleu": 0-100, "bleu_tokenize": "13a" or
    "zh"}, replies in order).
    A prompt too long for the model's context gets the reply None: a miss, never a crash. Replies
    stop at max_new_tokens, by default 16 tokens past their own reference (a reply that long
    cannot match any more; BLEU counts what it said up to there): an untrained model's rambling
    costs as much as a short answer, not as much as the longest one. No records: NaN, not 0."""
    if not records:
        return {"exact_match": {"overall": float("nan")}, "bleu": float("nan")}, []
    limits = [max_new_tokens or len(template.tok.encode(r["answer"])) + 16 for r in records]
    replies = greedy_replies(model, template, [r["messages"] for r in records], limits)
    hits, totals = defaultdict(int), defaultdict(int)
    for r, out in zip(records, replies):
        fam = r.get("family", "all")
        totals[fam] += 1
        hits[fam] += int(out is not None and out.strip() == r["answer"].strip())
    em = {f: hits[f] / totals[f] for f in sorted(totals)}
    em["overall"] = sum(hits.values()) / sum(totals.values())
    references = [r["answer"] for r in records]
    bleu_tokenize = pick_tokenizer(references)  # "13a", or "zh" for Chinese references
    bleu = corpus_bleu([out or "" for out in replies], references, bleu_tokenize)
    return {"exact_match": em, "bleu": bleu, "bleu_tokenize": bleu_tokenize}, replies


def greedy_replies(model, template, conversations, limits, batch=64):
    """The reply text to each conversation (None where the prompt leaves no room in the context),
    at most limits[i] tokens. Prompts of one length are decoded together, up to `batch` at a time."""
    prompts = [template.render_prompt(messages) for messages in conversations]
    by_length = defaultdict(list)  # prompt length -> indices
    for i, p in enumerate(prompts):
        by_length[len(p)].append(i)
    replies = [None] * len(prompts)
    for same in by_length.values():
        for rows in (same[k:k + batch] for k in range(0, len(same), batch)):
            try:
                ids = greedy_batch(model, [prompts[i] for i in rows], [limits[i] for i in rows], template.stop_ids,
                                   template.tok.vocab_size)
            except ValueError:  # prompts of this length do not fit in the context: their replies stay None
                continue
            for i, reply_ids in zip(rows, ids):
                replies[i] = template.tok.decode(reply_ids)
    return replies


def as_conversations(records):
    """Held-out prompts with the reference answer as the assistant's turn: what the loss scores."""
    return [{"messages": r["messages"] + [{"role": "assistant", "content": r["answer"]}]} for r in records]


# -----------------------------------------------------------------------------
# reporting: the before/after table and sample conversations

def table(columns):
    """columns: {"label": metrics dict, ...} -> a text table, one row per number (a row no column
    has is left out: params and tokens/s only appear in compare.py's table)."""
    names = list(columns)
    rows = [("params", "params", "{:,}"), ("tokens/s", "tokens_per_s", "{:,.0f}"), ("val loss", "val_loss", "{:.4f}"),
            ("val ppl", "val_ppl", "{:.3f}"), ("answer loss", "answer_loss", "{:.4f}"),
            ("answer ppl", "answer_ppl", "{:.3f}"), ("BLEU", "bleu", "{:.2f}"), ("pair loss", "pair_loss", "{:.4f}"),
            ("pair accuracy", "pair_accuracy", "{:.1%}"), ("reward chosen", "reward_chosen", "{:.3f}"),
            ("reward rejected", "reward_rejected", "{:.3f}"), ("reward margin", "reward_margin", "{:.3f}"),
            ("run time (s)", "wall_time_s", "{:.0f}")]
    families = sorted({f for m in columns.values() for f in m.get("exact_match", {})} - {"overall"})
    if families == ["all"]:  # prompts without families: "all" is the overall figure again
        families = []
    rows += [(f"exact match {f}", ("exact_match", f), "{:.1%}") for f in families + ["overall"]]

    def cell(m, key, fmt):
        v = m.get(key[0], {}).get(key[1]) if isinstance(key, tuple) else m.get(key)
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)
    width = max(12, *(shown_width(n) + 2 for n in names))  # long labels (compare's variant names) still line up
    lines = [" " * 22 + "".join(pad(n, width) for n in names)]
    for label, key, fmt in rows:
        cells = [cell(columns[n], key, fmt) for n in names]
        if any(c != "-" for c in cells):
            lines.append(pad(label, -22) + "".join(pad(c, width) for c in cells))
    return "\n".join(lines)


def shown_width(text):
    """Columns text takes on a terminal: Chinese, Japanese and Korean characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def pad(text, width):
    """text padded with spaces to `width` columns: right-aligned, or left-aligned for a negative width."""
    fill = " " * max(abs(width) - shown_width(text), 0)
    return text + fill if width < 0 else fill + text


def brief(m):
    """One line of evaluation results, as train.py prints them during a run."""
    parts = [f"val loss {m['val_loss']:.4f} (ppl {m['val_ppl']:.3f})"] if "val_loss" in m else []
    if "pair_accuracy" in m:
        parts.append(f"pair loss {m['pair_loss']:.4f}, accuracy {m['pair_accuracy']:.1%}, margin {m['reward_margin']:.3f}")
    if "exact_match" in m:
        parts.append(f"exact match {m['exact_match']['overall']:.1%}, BLEU {m['bleu']:.2f}")
    return ", ".join(parts)


def pick_samples(records, replies, per_family=1):
    """The first `per_family` prompts of each family, with every model's reply to them.
    replies: {"label": list of replies in record order} -> list of sample dicts."""
    seen, out = defaultdict(int), []
    for i, r in enumerate(records):
        fam = r.get("family", "all")
        if seen[fam] < per_family:
            seen[fam] += 1
            out.append({"family": fam, "messages": r["messages"], "answer": r["answer"],
                        **{label: rs[i] for label, rs in replies.items()}})
    return out


def format_samples(samples, labels):
    """Sample dicts -> text: each prompt's messages, then the expected answer and every model's reply."""
    lines = []
    for s in samples:
        lines.append(f"[{s['family']}]")
        lines += [f"  {m['role']:>9}: {m['content']}" for m in s["messages"]]
        for label in ["answer"] + list(labels):
            text = "(prompt too long)" if s[label] is None else s[label]
            lines.append(f"  {'expected' if label == 'answer' else label:>9}> {text}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the command line: evaluate a saved run

def evaluate_run(model, template, records, batch_size=16, max_new_tokens=None):
    """All the numbers for one model on held-out records. Its loss is the answer loss: over the
    reference answers of these prompts, not train.py's validation loss over the validation
    conversations (answer_dropped: prompts too long for the context even without their earlier
    exchanges, left out of it; the replies count them as misses)."""
    samples, counts = render_conversations(as_conversations(records), template, model.cfg.max_seq_len + 1,
                                           train_on="last-assistant")
    # rows as long as the longest conversation, not the model's whole context (131,072 for some
    # Hugging Face models: the attention masks alone would not fit)
    row_len = max((len(ids) for ids, _ in samples), default=2)
    packed = pack(samples, row_len, template.pad)
    loss, ppl = loss_and_ppl(*validation_loss(model, packed, batch_size))
    scores, replies = generation_metrics(model, template, records, max_new_tokens)
    return {"answer_loss": loss, "answer_ppl": ppl, "answer_dropped": counts["dropped"], **scores}, replies


def report(run_dirs):
    """Runs' final numbers side by side, from their metrics.json (no evaluation): make align's table."""
    columns = {}
    for d in run_dirs:
        m = read_json(os.path.join(d, "metrics.json"))
        columns[os.path.basename(os.path.realpath(d))] = {**m["after"], "wall_time_s": m["wall_time_s"]}
    return table(columns)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m nanosft.evaluate", description="evaluate a trained run")
    p.add_argument("--ckpt", default="runs/latest", help="run directory or Hugging Face directory")
    p.add_argument("--data", default="data/eval.jsonl",
                   help='held-out prompts with an "answer", or conversations (the last assistant turn is the answer)')
    p.add_argument("--format", default="auto", choices=("auto",) + FORMATS,
                   help="the data's format when it holds conversations")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="reply length limit (default: 16 tokens past each reference answer)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--samples", type=int, default=1, help="sample conversations to show per family")
    p.add_argument("--json", default=None, help="also write the numbers (and the samples) to this JSON file")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: the faster of 1 and all cores, measured)")
    p.add_argument("--quantize", default=None, choices=QUANTIZE, help="evaluate the model with its weights "
                   "quantized (quantize.py)")
    p.add_argument("--report", nargs="+", metavar="RUN", help="instead: these runs' final numbers side by side, "
                   "as their metrics.json holds them")
    args = p.parse_args(argv)
    if args.report:
        try:
            return print(report(args.report))
        except (OSError, ValueError, KeyError) as e:
            sys.exit(f"error: {e}: not a finished train.py run")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    if args.threads < 0:
        p.error("--threads must not be negative (0: measured)")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device {args.device}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no GPU that torch can use here")
    # found out now, not after the evaluation
    if args.json and (os.path.isdir(args.json) or not os.path.isdir(os.path.dirname(os.path.abspath(args.json)))):
        p.error(f"--json {args.json}: not a file name in an existing folder")
    try:
        model, tok = load_model(args.ckpt, device=args.device)
        if args.quantize:  # (refused for a model already quantized, or int4 and a width not in groups of 32)
            quantize_model(model, args.quantize)
        records = load_held_out(args.data, args.format)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    if args.threads:
        torch.set_num_threads(args.threads)
    else:  # greedy decoding of a small model is hundreds of tiny operations a token: often 1 thread is faster
        print(f"decoding on {why_threads(*decoding_threads(model))}")
    metrics, replies = evaluate_run(model, ChatTemplate(tok), records, max_new_tokens=args.max_new_tokens)
    samples = pick_samples(records, {"model": replies}, args.samples)
    print(f"{describe_path(args.ckpt)}{f' quantized {args.quantize}' if args.quantize else ''} on {len(records)} "
          f"held-out prompts from {args.data}"
          + (f" ({metrics['answer_dropped']} too long for the context, left out of the loss)"
             if metrics["answer_dropped"] else "")
          + ":")
    print(table({"model": metrics}))
    print(format_samples(samples, ["model"]))
    if args.json:
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump({**metrics, "samples": samples}, f, indent=2, ensure_ascii=False)
        except OSError as e:
            sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
