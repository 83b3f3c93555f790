"""
Teach a trained model a new skill with LoRA, keeping the old ones; and the same with a full
fine-tune of the same steps, side by side. `make lora-demo` after `make train`:

    .venv/bin/python bench/lora_demo.py [--base runs/latest] [--steps 200] [--json out.json]

The new skill is data/generate.py's "last" ("What is the last word of: blue river stone" ->
"stone"), which the default data never teaches. Both runs start from --base and see the same
rows: 15% the new skill, 85% the default data again (without that replay, both forget most of
the old skills within a hundred steps: the README has the figures). LoRA: rank 8 on every
projection, the adapters' learning rate 5e-3; full fine-tuning: AdamW at 1e-3, a usual rate for
a trained model. Held-out prompts of every skill are answered before and after (exact match), and
the table shows old skills' change next to the new skill's score.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "data"))
from generate import generate, write_jsonl  # noqa: E402  (data/generate.py)

NEW = "last"


def write_data(d, n_new):
    """The new skill's train/eval files and the default data's (same generator, same seed) in d."""
    new_train, _, new_eval = generate(n_new, 0, 200, seed=7, only=[NEW])
    old_train, _, old_eval = generate(76000, 1200, 1200)
    write_jsonl(os.path.join(d, "new.jsonl"), new_train)
    write_jsonl(os.path.join(d, "old.jsonl"), old_train)
    write_jsonl(os.path.join(d, "eval.jsonl"), old_eval + new_eval)


def train(base, out, d, steps, flags):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--init-from", base, "--out", out, "--steps", str(steps),
           "--data", os.path.join(d, "new.jsonl") + ":0.15", os.path.join(d, "old.jsonl") + ":0.85",
           "--val-data", "", "--eval-data", os.path.join(d, "eval.jsonl"), "--warmup-steps", "10", "--quiet",
           "--cache-dir", os.path.join(d, "cache"), *flags]
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"train.py failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as f:
        m = json.load(f)
    return {"before": m["before"]["exact_match"], "after": m["exact_match"], "wall_s": time.time() - t}


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--base", default=os.path.join(ROOT, "runs", "latest"), help="a trained run (make train)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "lora-demo"), help="where the two runs go")
    p.add_argument("--json", default="", help="also write the figures here")
    args = p.parse_args()
    if not os.path.exists(os.path.join(args.base, "config.json")):
        sys.exit(f"no trained model at {args.base}: run `make train` first (or give --base)")
    with tempfile.TemporaryDirectory() as d:
        write_data(d, 40000)
        runs = {"lora": train(args.base, os.path.join(args.out, "lora"), d, args.steps,
                              ["--lora-rank", "8", "--lora-lr", "5e-3"]),
                "full": train(args.base, os.path.join(args.out, "full"), d, args.steps, ["--lr", "1e-3"])}
    before = runs["lora"]["before"]
    skills = [k for k in before if k != "overall"]
    print(f"exact match on held-out prompts, {args.steps} steps from {os.path.realpath(args.base)}")
    print(f"{'skill':<12}{'before':>8}{'LoRA':>8}{'change':>8}{'full':>8}{'change':>8}")
    for s in skills:
        b, lo, fu = before[s], runs["lora"]["after"][s], runs["full"]["after"][s]
        new = " (new)" if s == NEW else ""
        print(f"{s:<12}{100 * b:>7.1f}%{100 * lo:>7.1f}%{100 * (lo - b):>+8.1f}{100 * fu:>7.1f}%{100 * (fu - b):>+8.1f}{new}")
    old = [s for s in skills if s != NEW]
    for name, r in runs.items():
        worst = min(r["after"][s] - before[s] for s in old)
        r.update(worst_old_change=worst, new_skill=r["after"][NEW])
        print(f"{name}: new skill {100 * r['after'][NEW]:.1f}%, worst old-skill change {100 * worst:+.1f} points, "
              f"{r['wall_s']:.0f} s (train.py, start to end)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(runs, f, indent=2)


if __name__ == "__main__":
    main()
