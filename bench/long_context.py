"""
Long packed rows: peak memory and speed of one training step, blockwise attention mask against the
dense (T, T) one.

    .venv/bin/python bench/long_context.py [--lengths 2048,8192,32768] [--dense-up-to 8192]
                                           [--attn default,window,alibi] [--docs many|one] [--json out.json]

For each row length T and attention variant, a fresh process builds the tiny default model (fp32,
CPU), packs one row of T tokens with conversations of 20-300 tokens (--docs one: a single
conversation fills the row, the case where a block's keys reach furthest back) and times forward +
backward steps. Peak memory is the process's peak resident memory during the steps minus its
resident memory just before them, so the model, torch and Python are left out. "dense" runs the
same code with one block of T queries: the dense mask, built once and shared by the layers;
"blockwise" uses attention.BLOCK. The ratio columns, measured in the same invocation: d/b is
dense memory over blockwise memory, b/d blockwise tokens/s over dense tokens/s.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes():
    """This process's peak resident memory since it started (VmHWM). Not ru_maxrss: Linux carries
    the parent's peak over into a child it starts, which would hide a child's smaller one."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024


def packed_row(T, docs, seed=0):
    """(1, T) token ids, targets, doc and pos of one packed row."""
    import torch
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < T:
        lengths.append(T if docs == "one" else int(torch.randint(20, 301, (), generator=g)))
    lengths[-1] -= sum(lengths) - T
    doc = torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)])[None]  # (1, T)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]  # (1, T)
    ids = torch.randint(0, 1024, (1, T + 1), generator=g)
    return ids[:, :-1], ids[:, 1:], doc, pos


def one(T, mode, attn, docs, steps):
    """Run in a child process: -> {"peak_mib", "step_s", "tok_s"} of training steps at row length T."""
    import torch
    from nanosft import attention
    from nanosft.model import ModelConfig, Transformer
    torch.manual_seed(0)
    variant = {} if attn == "default" else dict(attention.VARIANTS[attn])
    if attn == "window":
        variant["window"] = 256  # VARIANTS' 16 suits the default 256-token rows; long rows get longer reach
    model = Transformer(ModelConfig(vocab_size=1024, max_seq_len=T, n_layer=4, n_head=4, n_kv_head=2, dim=128,
                                    attn_impl="sdpa", **variant))
    if mode == "dense":
        attention.BLOCK = T  # one block of every query: the dense mask
    idx, targets, doc, pos = packed_row(T, docs)
    rss0 = rss_bytes()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss, n = model(idx, pos=pos, doc=doc, targets=targets)
        (loss / n).backward()
        times.append(time.perf_counter() - t0)
    peak = peak_rss_bytes() - rss0
    step = min(times)
    return {"peak_mib": peak / 2**20, "step_s": step, "tok_s": T / step}


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--lengths", default="2048,8192,32768")
    p.add_argument("--dense-up-to", type=int, default=8192, help="longest row to try the dense mask on")
    p.add_argument("--attn", default="default,window,alibi", help="attention variants (attention.VARIANTS names)")
    p.add_argument("--docs", default="many", choices=["many", "one"])
    p.add_argument("--steps", type=int, default=3, help="steps per measurement (the fastest counts)")
    p.add_argument("--json", default="")
    p.add_argument("--one", nargs=3, metavar=("T", "MODE", "ATTN"), help=argparse.SUPPRESS)  # the child
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1], args.one[2], args.docs, args.steps)))
        return

    import torch
    from nanosft import attention
    print(f"one packed row, tiny model (dim 128, 4 layers), fp32, {torch.get_num_threads()} threads, "
          f"conversations: {args.docs}, blocks of {attention.BLOCK} queries")
    print(f"{'attn':8} {'T':>6} {'dense MiB':>10} {'block MiB':>10} {'d/b':>6} {'dense tok/s':>12} "
          f"{'block tok/s':>12} {'b/d':>6}")
    results = []
    for attn in args.attn.split(","):
        for T in map(int, args.lengths.split(",")):
            row = {"attn": attn, "T": T, "docs": args.docs}
            for mode in ("dense", "blockwise"):
                if mode == "dense" and T > args.dense_up_to:
                    continue
                cmd = [sys.executable, __file__, "--one", str(T), mode, attn, "--docs", args.docs,
                       "--steps", str(args.steps)]
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode:
                    raise SystemExit(f"{attn} T={T} {mode} failed:\n{r.stderr[-2000:]}")
                row[mode] = json.loads(r.stdout)
            results.append(row)
            d, b = row.get("dense"), row["blockwise"]
            cols = (f"{d['peak_mib']:10.1f}" if d else f"{'-':>10}", f"{b['peak_mib']:10.1f}",
                    f"{d['peak_mib'] / b['peak_mib']:6.2f}" if d else f"{'-':>6}",
                    f"{d['tok_s']:12,.0f}" if d else f"{'-':>12}", f"{b['tok_s']:12,.0f}",
                    f"{b['tok_s'] / d['tok_s']:6.2f}" if d else f"{'-':>6}")
            print(f"{attn:8} {T:6d} " + " ".join(cols), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
