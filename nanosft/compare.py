"""
The attention lab's bench: train each attention variant on the same data, seed and token budget,
then compare them side by side.

    python -m nanosft.compare --variants mha gqa window alibi [--steps 500] [-- more train.py flags]
    make compare VARIANTS="mha gqa window alibi"

Each variant is a fresh `train.py --attn NAME` run in runs/compare/<name>/ (its own process, so no
variant inherits another's threads, memory or compiled kernels), with every other flag the same:
--steps, --seed and the train.py flags after `--` (paths in them relative to where you are).
Variants are the names in attention.py's VARIANTS. Afterwards, in runs/compare/:
  compare.png   validation loss (markers) and smoothed training loss of every variant, one chart
  compare.json  per variant: parameters, training tokens/s, final validation loss and perplexity,
                exact match per family on the held-out prompts and BLEU, steps and tokens
and the same figures as a table on stdout (evaluate.py's table, one column per variant). Rerunning
a variant replaces its run directory.
"""

import argparse
import json
import os
import subprocess
import sys
import time

from nanosft.attention import VARIANTS
from nanosft.evaluate import table
from nanosft.plot import curves, smooth

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: train.py is there


def train_variant(name, out, steps, seed, extra):
    """Run train.py for one variant (out: an absolute path); its output streams through. -> the
    run's metrics.json."""
    run_dir = os.path.join(out, name)
    cmd = [sys.executable, os.path.join(HERE, "train.py"), "--attn", name, "--out", run_dir, "--steps", str(steps),
           "--seed", str(seed), "--eval-every", str(max(steps // 5, 1)), "--quiet", "--log-every", "100"] + extra
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    if subprocess.run(cmd).returncode != 0:
        sys.exit(f"error: the {name!r} run failed (see its output above); the runs before it are in {out}")
    with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as f:
        return json.load(f)


def summary(name, metrics, run_dir):
    """The figures compare.json keeps of one run, and its loss curves against tokens seen."""
    c = curves(run_dir)
    return {"params": metrics["params"], "tokens_per_s": metrics["train_tokens_per_s"],
            "val_loss": metrics["val_loss"], "val_ppl": metrics["val_ppl"], "exact_match": metrics["exact_match"],
            "bleu": metrics["bleu"],
            "steps": metrics["steps"], "tokens": metrics["tokens"], "train_time_s": metrics["train_time_s"],
            "config": VARIANTS[name],
            "curves": {"train": c["train"], "val": c["val"]}}


def plot(results, path):
    """compare.png: each variant's smoothed training loss (line) and validation loss (markers) in one
    colour, against tokens seen, all variants on one log-scale chart."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for i, (name, r) in enumerate(results.items()):
        color = f"C{i}"
        train, val = r["curves"]["train"], r["curves"]["val"]
        ax.plot([t for t, _ in train], smooth([v for _, v in train]), lw=1.2, color=color,
                label=f"{name} train (smoothed)")
        ax.plot([t for t, _ in val], [v for _, v in val], "o--", ms=4, lw=0.8, color=color, label=f"{name} validation")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats per supervised token)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="upper right")
    ax.set_title("attention variants: same data, seed and token budget")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv=None):
    """compare's flags. A --steps or --seed among the train.py flags after -- is taken as compare's
    own (`make compare ARGS="--steps 100"` passes its flags that way); --attn and --out there are
    refused: compare sets them per variant."""
    p = argparse.ArgumentParser(prog="python -m nanosft.compare", description=__doc__.strip().splitlines()[0])
    p.add_argument("--variants", nargs="+", default=["mha", "gqa", "window", "alibi"], metavar="NAME",
                   help=f"attention variants to train, from attention.py's VARIANTS: {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=500, help="optimizer steps per variant (the same token budget)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", default=os.path.join(HERE, "runs", "compare"))
    p.add_argument("train_args", nargs="*", help="after --: more train.py flags, the same for every variant")
    args = p.parse_args(argv)
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--steps", type=int, default=args.steps)
    own.add_argument("--seed", type=int, default=args.seed)
    found, args.train_args = own.parse_known_args(args.train_args)
    args.steps, args.seed = found.steps, found.seed
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}: attention.py's VARIANTS has {', '.join(VARIANTS)}")
    if len(set(args.variants)) != len(args.variants):
        p.error("a variant is named twice")
    fixed = [f for f in ("--attn", "--out") if any(a.split("=")[0] == f for a in args.train_args)]
    if fixed:
        p.error(f"{', '.join(fixed)} after -- would differ from what compare sets for each variant")
    args.out = os.path.abspath(args.out)
    return args


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    results = {}
    for name in args.variants:
        metrics = train_variant(name, args.out, args.steps, args.seed, args.train_args)
        results[name] = summary(name, metrics, os.path.join(args.out, name))
    with open(os.path.join(args.out, "compare.json"), "w", encoding="utf-8") as f:
        json.dump({"steps": args.steps, "seed": args.seed, "train_args": args.train_args, "variants": results},
                  f, indent=2, ensure_ascii=False)
    plot(results, os.path.join(args.out, "compare.png"))
    print(table(results))
    print(f"{len(results)} variants in {time.time() - t0:.0f}s; wrote {args.out}/compare.png and compare.json")


if __name__ == "__main__":
    main()
