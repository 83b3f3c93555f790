"""
Generation benchmark: tokens/s of nanosft's KV-cache decoding against recomputing the sequence every
step, and against Hugging Face transformers' `generate` on the same weights.

    .venv/bin/python bench/generate.py [--prompt-tokens 16,512] [--new-tokens 256] [--threads 1]
                                       [--dim 128 --n-layer 4 --n-head 4 --n-kv-head 2] [--ckpt runs/latest]
                                       [--no-hf] [--json out.json]

The cached side is nanosft.generate.generate, the code chat.py streams from: the prompt goes through
the model once, then each new token costs the forward of one position, attending over the cached
keys and values. "recompute" runs the model over the prompt and everything generated so far at
every step, so step i costs a forward of prompt + i positions. "hf_generate" is
LlamaForCausalLM.generate (greedy, its own KV cache) holding the same weights. All decode greedily
for exactly --new-tokens tokens (no stop ids) from the same prompt, and the script checks that they
choose the same ids. Reported: tokens/s over the whole reply (prefill included), time to first
token (not for hf_generate, which returns everything at once) and the ratios, best of --repeats
after one warm-up run. The model is the default ModelConfig shape with random weights (fixed seed)
and a context long enough for prompt and reply, or a trained run (--ckpt). CUDA when available,
else CPU.
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanosft.generate import generate  # noqa: E402
from nanosft.model import ModelConfig, Transformer  # noqa: E402


def with_cache(model, prompt, n):
    return generate(model, prompt, max_new_tokens=n, temperature=0.0)  # yields ids one at a time


def recompute(model, prompt, n):
    """Greedy, no cache: the full sequence through the model at every step."""
    device = model.embed_tokens.weight.device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    for _ in range(n):
        t = int(model(ids)[0, -1].argmax())
        yield t
        ids = torch.cat([ids, torch.tensor([[t]], dtype=torch.long, device=device)], dim=1)


def hf_generate(model, prompt, n):
    """transformers' generate, greedy, forced to exactly n new tokens; model is (ours, hf) here."""
    hf = model[1]
    ids = torch.tensor([prompt], dtype=torch.long, device=hf.device)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def timed(method, model, prompt, n, device):
    """-> (ids, seconds to the first token, seconds for all n tokens)"""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    ids, first = [], None
    for t in method(model, prompt, n):
        ids.append(t)  # int(): the token is on the host, so the device has finished computing it
        first = first or time.perf_counter() - t0
    return ids, first, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--ckpt", default="", help="a run directory to load (default: random default-shape model)")
    d = ModelConfig()
    for name in ("dim", "n_layer", "n_head", "n_kv_head"):  # model shape, ModelConfig's defaults
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-tokens", default="16,512", help="comma-separated prompt lengths")
    p.add_argument("--no-hf", dest="hf", action="store_false", help="skip transformers' generate")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method; the best is reported")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the figures here")
    args = p.parse_args()
    prompt_lens = [int(x) for x in args.prompt_tokens.split(",")]
    if min(args.new_tokens, args.repeats, *prompt_lens) < 1:
        p.error("--new-tokens, --prompt-tokens and --repeats must be at least 1")

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    need = max(prompt_lens) + args.new_tokens
    if args.ckpt:
        from nanosft.checkpoint import load_model
        model, _ = load_model(args.ckpt, device=device)
        if model.cfg.max_seq_len < need:
            sys.exit(f"error: {args.ckpt} has a context of {model.cfg.max_seq_len} tokens, less than "
                     f"--prompt-tokens {max(prompt_lens)} + --new-tokens {args.new_tokens} = {need}; lower them")
    else:
        cfg = ModelConfig(dim=args.dim, n_layer=args.n_layer, n_head=args.n_head, n_kv_head=args.n_kv_head,
                          max_seq_len=max(512, need))
        model = Transformer(cfg).to(device).eval()
    methods = {"kv_cache": (with_cache, model), "recompute": (recompute, model)}
    if args.hf:
        from train_step import hf_twin  # transformers: a test and benchmark dependency
        methods["hf_generate"] = (hf_generate, (model, hf_twin(model).eval()))
    cfg, n = model.cfg, args.new_tokens

    print(f"{type(model).__name__}: {model.num_params():,} parameters, dim {cfg.dim}, {cfg.n_layer} layers, "
          f"{cfg.n_head} heads / {cfg.n_kv_head} kv heads, {'--ckpt ' + args.ckpt if args.ckpt else 'random init'}; "
          f"{device.type}, {torch.get_num_threads()} threads; {n} new tokens, best of {args.repeats}")
    print(f"\n{'prompt':>6} {'':12} {'tokens/s':>10} {'decode tok/s':>13} {'first token ms':>15} {'total s':>9}")
    runs, all_same = [], True
    for plen in prompt_lens:
        prompt = torch.randint(0, cfg.vocab_size, (plen,)).tolist()
        results = {}
        with torch.inference_mode():
            for name, (method, m) in methods.items():
                timed(method, m, prompt, n, device)  # warm-up
                tries = [timed(method, m, prompt, n, device) for _ in range(args.repeats)]
                ids, ttft, total = min(tries, key=lambda r: r[2])
                whole = name == "hf_generate"  # no first token before the last
                results[name] = {"ids": ids, "seconds": total, "tokens_per_s": n / total,
                                 "ttft_ms": None if whole else 1e3 * ttft,
                                 "decode_tokens_per_s": (n - 1) / (total - ttft) if n > 1 and not whole else None}
        ref = results["kv_cache"]["ids"]
        run = {"prompt_tokens": plen, "new_tokens": n}
        for name, r in results.items():
            first_diff = next((i for i, (x, y) in enumerate(zip(ref, r["ids"])) if x != y), None)
            r["identical_ids"] = first_diff is None and len(r["ids"]) == n
            r["first_difference"] = first_diff
            all_same &= r["identical_ids"]
            if name != "kv_cache":
                run[f"speedup_vs_{name}"] = results["kv_cache"]["tokens_per_s"] / r["tokens_per_s"]
            print(f"{plen:6} {name:12} {r['tokens_per_s']:10.1f} {r['decode_tokens_per_s'] or 0:13.1f} "
                  f"{r['ttft_ms'] or 0:15.2f} {r['seconds']:9.3f}" + ("" if r["identical_ids"] else
                                                                       f"  ids differ from token {first_diff}"))
        print("       kv_cache speed-up: " + ", ".join(f"{v:.2f}x vs {k.removeprefix('speedup_vs_')}"
                                                       for k, v in run.items() if k.startswith("speedup")))
        runs.append({**run, **{k: {f: v for f, v in r.items() if f != "ids"} for k, r in results.items()}})
    print("identical greedy ids everywhere: " + ("yes" if all_same else "NO"))
    if args.json:
        out = {"device": device.type, "threads": torch.get_num_threads(), "params": model.num_params(),
               "dim": cfg.dim, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_kv_head": cfg.n_kv_head,
               "ckpt": args.ckpt or None, "repeats": args.repeats, "identical_ids": all_same, "runs": runs}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    if not all_same:
        sys.exit(1)


if __name__ == "__main__":
    main()
