"""
LoRA against full fine-tuning in nanosft, and against transformers + PEFT, on one base model.

    .venv/bin/python bench/lora.py [--dim 512] [--layers 8] [--rank 8] [--batch 8] [--seq 256]
                                   [--dtype fp32|bf16] [--steps 10] [--rounds 3] [--json out.json]

The base is a random LlamaForCausalLM (d=512, 8 layers by default) saved once; nanosft loads the same
directory. Each job runs in a fresh process on all cores, as a training run does, and times forward +
backward + AdamW steps on one random batch (the first step, which creates the optimizer state, is
not timed):

    nanosft LoRA     lora.add_lora on every projection, AdamW on the adapters alone
    nanosft full     AdamW on every weight
    PEFT LoRA        peft.get_peft_model with the same rank, alpha and target modules

Each job runs --rounds times, the three taking turns, and its best round counts. Reported per job:
tokens/s, the model states (weights + gradients + optimizer state, counted tensor
by tensor after a step) and the peak resident memory the steps added. Then the ratios the README
quotes, all from this one invocation: LoRA/full and nanosft/PEFT tokens/s, and LoRA's gradients +
optimizer state as a share of full fine-tuning's. Separately, --memory-json runs train.py itself
(DeepSpeed, 3 steps) with and without --lora-rank and reads both runs' memory.json.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peak_rss_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_base(directory, dim, layers, vocab):
    import torch
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=dim * 8 // 3 // 32 * 32 + 32,
                                   num_hidden_layers=layers, num_attention_heads=dim // 64, num_key_value_heads=dim // 128,
                                   max_position_embeddings=1024, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(directory)


def job(kind, base, rank, batch, seq, dtype, steps):
    """One measurement, in this (fresh) process -> dict."""
    import torch
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    torch.manual_seed(1)
    if kind == "peft":
        import transformers
        from peft import LoraConfig, get_peft_model
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=dt, attn_implementation="sdpa")
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
        vocab = model.config.vocab_size

        def loss_of(idx):
            return model(input_ids=idx[:, :-1], labels=idx[:, :-1]).loss  # (its labels are shifted inside)
    else:
        from nanosft.checkpoint import load_model
        from nanosft.lora import add_lora
        model, _ = load_model(base)
        model = model.to(dt).train()
        if kind == "lora":
            add_lora(model, TARGETS, rank, 2 * rank)
        vocab = model.cfg.vocab_size

        def loss_of(idx):
            total, n = model(idx[:, :-1], targets=idx[:, 1:])
            return total / n
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    idx = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(2))

    def step():
        loss_of(idx).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # gradients stay allocated, as they are between steps
    step()  # creates the optimizer state
    before = rss_bytes()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - t
    size = lambda ts: sum(x.numel() * x.element_size() for x in ts)  # noqa: E731
    weights = size({id(p): p for p in model.parameters()}.values())
    grads = size(p.grad for p in params if p.grad is not None)
    state = size(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return {"tokens_per_s": batch * seq * steps / elapsed, "weights": weights, "gradients": grads,
            "optimizer_state": state, "trained_params": sum(p.numel() for p in params),
            "peak_added_mib": max(peak_rss_bytes() - before, 0) / 2 ** 20}


def memory_json(base, rank, out_dir, dtype):
    """train.py with and without LoRA, 3 steps each, on the same base: their memory.json."""
    data = os.path.join(ROOT, "data", "train.jsonl")
    if not os.path.exists(data):
        subprocess.run([sys.executable, os.path.join(ROOT, "data", "generate.py")], check=True, capture_output=True)
    found = {}
    for name, flags in (("lora", ["--lora-rank", str(rank), "--lora-alpha", str(2 * rank)]), ("full", [])):
        out = os.path.join(out_dir, name)
        r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--init-from", base, "--out", out,
                            "--steps", "3", "--val-data", "", "--eval-data", "", "--quiet", "--dtype", dtype,
                            "--batch-size", "2", "--max-seq-len", "256", "--tokenizer", base, *flags],
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"train.py failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
        with open(os.path.join(out, "memory.json"), encoding="utf-8") as f:
            found[name] = json.load(f)["per_rank"][0]["cpu"]
    share = lambda m: m["gradients"] + m["optimizer_state"] + m["master_weights"]  # noqa: E731
    return {**found, "lora_over_full_grads_and_optimizer": share(found["lora"]) / share(found["full"])}


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="each job's best of this many runs")
    p.add_argument("--json", default="")
    p.add_argument("--job", default="", help=argparse.SUPPRESS)  # (a child process: one measurement)
    p.add_argument("--base", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.job:
        print(json.dumps(job(args.job, args.base, args.rank, args.batch, args.seq, args.dtype, args.steps)))
        return
    with tempfile.TemporaryDirectory() as d:
        base = os.path.join(d, "base")
        make_base(base, args.dim, args.layers, args.vocab)
        from nanosft.tokenizer import Tokenizer  # the base needs a tokenizer for train.py
        Tokenizer.train([f"word {i} and {i * 7}" for i in range(3000)], args.vocab - 8).save(os.path.join(base, "tokenizer.model"))
        results = {}
        for _ in range(args.rounds):  # the jobs take turns, so a slow spell of the machine hits all of them
            for kind in ("lora", "full", "peft"):
                r = subprocess.run([sys.executable, __file__, "--job", kind, "--base", base, "--rank", str(args.rank),
                                    "--batch", str(args.batch), "--seq", str(args.seq), "--dtype", args.dtype,
                                    "--steps", str(args.steps)], capture_output=True, text=True)
                if r.returncode != 0:
                    sys.exit(f"{kind} failed:\n{r.stderr[-3000:]}")
                got = json.loads(r.stdout.strip().splitlines()[-1])
                if kind not in results or got["tokens_per_s"] > results[kind]["tokens_per_s"]:
                    results[kind] = got  # each job's best round
        results["memory_json"] = memory_json(base, args.rank, os.path.join(d, "runs"), args.dtype)
    mib = 2 ** 20
    print(f"d={args.dim}, {args.layers} layers, rank {args.rank} on {', '.join(TARGETS)}; batch {args.batch} x "
          f"{args.seq} tokens, {args.dtype}, {args.steps} timed steps, best of {args.rounds} rounds")
    print(f"{'job':<14}{'tokens/s':>10}{'trained':>12}{'weights MiB':>13}{'grads MiB':>11}{'Adam MiB':>10}{'peak+ MiB':>11}")
    for kind, label in (("lora", "nanosft LoRA"), ("full", "nanosft full"), ("peft", "PEFT LoRA")):
        r = results[kind]
        print(f"{label:<14}{r['tokens_per_s']:>10,.0f}{r['trained_params']:>12,}{r['weights'] / mib:>13.1f}"
              f"{r['gradients'] / mib:>11.2f}{r['optimizer_state'] / mib:>10.2f}{r['peak_added_mib']:>11.1f}")
    lo, fu, pe = results["lora"], results["full"], results["peft"]
    results["ratios"] = {"lora_over_full_tokens_per_s": lo["tokens_per_s"] / fu["tokens_per_s"],
                         "lora_over_peft_tokens_per_s": lo["tokens_per_s"] / pe["tokens_per_s"],
                         "lora_over_full_grads_and_optimizer": (lo["gradients"] + lo["optimizer_state"])
                         / (fu["gradients"] + fu["optimizer_state"])}
    ratios = results["ratios"]
    print(f"LoRA tokens/s: {ratios['lora_over_full_tokens_per_s']:.2f}x nanosft full fine-tuning (target >= 1.2), "
          f"{ratios['lora_over_peft_tokens_per_s']:.2f}x transformers + PEFT (target >= 1.0)")
    print(f"LoRA gradients + optimizer state: {100 * ratios['lora_over_full_grads_and_optimizer']:.2f}% of full "
          f"fine-tuning's here, {100 * results['memory_json']['lora_over_full_grads_and_optimizer']:.2f}% in "
          "train.py's memory.json (target <= 5%)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
