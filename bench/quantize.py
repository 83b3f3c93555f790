"""
Weight-only quantization benchmark (nanosft/quantize.py): for each model, fp32 against int8 and int4
on validation perplexity, size and decoding speed.

    .venv/bin/python bench/quantize.py [--ckpt runs/latest ...] [--train-d512 STEPS] [--d512-out DIR]
                                       [--new-tokens 128] [--repeats 7] [--threads 1] [--json out.json]

- validation perplexity: data/val.jsonl rendered and packed as train.py renders its validation data
  (rows of max_seq_len + 1, assistant-only loss), through nanosft.evaluate.validation_loss
  (token-weighted). For the fp32 model this is train.py's final val loss, up to the dtype the run
  validated in (a bf16 run's metrics.json differs in the 4th decimal).
- size: the matrices quantization replaces (every linear layer and the embedding: fp32 weights
  against qweight + scales), the whole model in memory (every parameter and buffer, a tied
  matrix once), and the whole model.safetensors each writes (checkpoint.save_model).
- decoding: greedy nanosft.generate.generate of exactly --new-tokens tokens (no stop token) from
  one chat prompt, on --threads threads; the variants take turns, --repeats times after a warm-up,
  and the median counts. Also whether each reply equals fp32's.
- exact match on --eval-data's held-out prompts (nanosft.evaluate.generation_metrics), unless ''.
Each quantized model is also saved and loaded back (checkpoint.load_model), which must give the
very same logits; the script exits non-zero when it does not.

--train-d512 STEPS first trains a d=512 model with train.py (--dim 512 --n-head 8 --n-kv-head 2,
default data, --batch-size 8, STEPS steps) into --d512-out, unless that run exists already, and
benchmarks it after the --ckpt models. Its `latest` link is made beside it, not in runs/.

The README's figures: the d=512 model trained by the command --train-d512 600 runs (started by
hand, with --threads 2 added so that a busy machine at start-up could not make it pick one thread;
val ppl 1.058 after 600 steps, 7:49), then `bench/quantize.py --ckpt runs/latest
runs/quantize-d512/run --repeats 9`, runs/latest being the default run (`make train`), on the
2-core Intel Xeon the README names.
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from nanosft.checkpoint import load_model, save_model  # noqa: E402
from nanosft.data import load_conversations, pack, render_conversations  # noqa: E402
from nanosft.evaluate import generation_metrics, load_held_out, loss_and_ppl, validation_loss  # noqa: E402
from nanosft.generate import generate  # noqa: E402
from nanosft.machine import cpu_name  # noqa: E402
from nanosft.quantize import QuantEmbedding, QuantLinear, quantization, quantize_model  # noqa: E402
from nanosft.template import ChatTemplate  # noqa: E402

PROMPT = [{"role": "user", "content": "Repeat after me: the lantern by the river shows the way home"}]


def unique_bytes(tensors):
    """Bytes of the distinct tensors among `tensors` (a tied matrix counted once)."""
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in tensors}.values())


def matrix_bytes(model):
    """Bytes of the matrices quantization replaces: float weights, or integers and scales."""
    tensors = []
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            tensors.append(m.weight)
        elif isinstance(m, (QuantLinear, QuantEmbedding)):
            tensors += [m.qweight, m.scales]
    return unique_bytes(tensors)


def model_bytes(model):
    return unique_bytes(list(model.parameters()) + list(model.buffers()))


def file_bytes(model, tok, directory):
    """Size of the model.safetensors checkpoint.save_model writes for it, and the directory."""
    save_model(directory, model.state_dict(), model.cfg, tok, quantization(model))
    return os.path.getsize(os.path.join(directory, "model.safetensors"))


def validation_rows(model, template, path):
    """path's conversations packed into rows as train.py packs its validation data."""
    records, _ = load_conversations(path)
    row_len = model.cfg.max_seq_len + 1
    samples, _ = render_conversations(records, template, row_len)
    return pack(samples, row_len, template.pad)


def decode_speed(variants, prompt, new_tokens, repeats):
    """-> ({name: median tokens/s}, {name: reply ids}): the variants take turns, repeats times."""
    def one(model):
        t = time.perf_counter()
        ids = list(generate(model, prompt, new_tokens))
        return len(ids) / (time.perf_counter() - t), ids
    for model in variants.values():  # warm-up
        one(model)
    speeds, replies = {name: [] for name in variants}, {}
    for _ in range(repeats):
        for name, model in variants.items():
            s, replies[name] = one(model)
            speeds[name].append(s)
    return {name: statistics.median(s) for name, s in speeds.items()}, replies


def same_logits_after_reload(model, directory):
    """The quantized model saved in `directory` loads back computing the very same logits."""
    loaded, _ = load_model(directory)
    x = torch.arange(32)[None] % model.cfg.vocab_size
    with torch.no_grad():
        return torch.equal(loaded(x), model(x))


def bench_model(ckpt, methods, args, workdir):
    fp32, tok = load_model(ckpt)
    template = ChatTemplate(tok)
    variants = {"fp32": fp32, **{m: quantize_model(copy.deepcopy(fp32), m) for m in methods}}
    rows = validation_rows(fp32, template, args.val_data)
    prompt = template.render_prompt(PROMPT)
    new_tokens = min(args.new_tokens, fp32.cfg.max_seq_len - len(prompt))
    speeds, replies = decode_speed(variants, prompt, new_tokens, args.repeats)
    records = load_held_out(args.eval_data) if args.eval_data else []
    results = []
    for name, model in variants.items():
        directory = os.path.join(workdir, f"{os.path.basename(os.path.realpath(ckpt))}-{name}")
        loss, ppl = loss_and_ppl(*validation_loss(model, rows))
        r = {"model": ckpt, "params": fp32.num_params(), "weights": name, "val_loss": loss, "val_ppl": ppl,
             "matrix_bytes": matrix_bytes(model), "model_bytes": model_bytes(model),
             "file_bytes": file_bytes(model, tok, directory), "decode_tokens_per_s": speeds[name],
             "reply_equals_fp32": replies[name] == replies["fp32"], "new_tokens": new_tokens}
        if records:
            r["exact_match"] = generation_metrics(model, template, records)[0]["exact_match"]["overall"]
        if name != "fp32":
            r["reloads_identically"] = same_logits_after_reload(model, directory)
        results.append(r)
        print(f"{ckpt} {name}: val ppl {ppl:.4f}, matrices {r['matrix_bytes']:,} bytes, "
              f"{speeds[name]:.0f} tokens/s", flush=True)
    base = results[0]
    for r in results:
        r["ppl_vs_fp32"] = r["val_ppl"] / base["val_ppl"]
        r["speed_vs_fp32"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        for k in ("matrix", "model", "file"):
            r[f"{k}_smaller"] = base[f"{k}_bytes"] / r[f"{k}_bytes"]
    return results


def train_d512(steps, out):
    """A d=512 model trained with train.py on the default data (skipped when `out` holds one)."""
    if os.path.exists(os.path.join(out, "model.safetensors")):
        print(f"{out}: trained already, reused")
        return
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--dim", "512", "--n-head", "8", "--n-kv-head", "2",
           "--steps", str(steps), "--batch-size", "8", "--eval-data", "", "--out", out, "--quiet"]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def table(results):
    """The README's table (markdown)."""
    lines = ["| model | weights | val ppl | vs fp32 | matrices (MB) | smaller | in memory (MB) | smaller | "
             "model.safetensors (MB) | smaller | decode tokens/s | vs fp32 | exact match |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        em = f"{r['exact_match']:.1%}" if "exact_match" in r else "-"
        lines.append(f"| `{r['model']}` ({r['params'] / 1e6:.1f}M) | {r['weights']} | "
                     f"{r['val_ppl']:.4f} | {r['ppl_vs_fp32'] - 1:+.2%} | {r['matrix_bytes'] / 1e6:.2f} | "
                     f"{r['matrix_smaller']:.2f}x | {r['model_bytes'] / 1e6:.2f} | {r['model_smaller']:.2f}x | "
                     f"{r['file_bytes'] / 1e6:.2f} | {r['file_smaller']:.2f}x | {r['decode_tokens_per_s']:,.0f} | "
                     f"{r['speed_vs_fp32']:.2f}x | {em} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--ckpt", nargs="*", default=["runs/latest"], help="models to quantize (fp32 run directories)")
    p.add_argument("--train-d512", type=int, default=0, metavar="STEPS", help="also train and benchmark a d=512 "
                   "model (0: no)")
    p.add_argument("--d512-out", default="runs/quantize-d512/run", help="where --train-d512 trains (or finds) it")
    p.add_argument("--methods", default="int8,int4")
    p.add_argument("--val-data", default="data/val.jsonl")
    p.add_argument("--eval-data", default="data/eval.jsonl", help="held-out prompts for exact match ('' to skip)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="", help="also write the figures here")
    args = p.parse_args()
    models = list(args.ckpt)
    if args.train_d512:
        train_d512(args.train_d512, args.d512_out)
        models.append(args.d512_out)
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for ckpt in models:
            results += bench_model(ckpt, args.methods.split(","), args, workdir)
    print(f"\n{cpu_name()}, {args.threads} thread(s), torch {torch.__version__}\n")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "results": results},
                      f, indent=2)
    broken = [f"{r['model']} {r['weights']}" for r in results if r.get("reloads_identically") is False]
    if broken:
        sys.exit(f"error: saved and loaded back, these computed other logits: {', '.join(broken)}")


if __name__ == "__main__":
    main()
