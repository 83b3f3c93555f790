"""
ZeRO memory benchmark: what each ZeRO stage (and offload) leaves on every rank, measured.

    .venv/bin/python bench/zero_memory.py [--ranks 2] [--dim 256] [--n-layer 8] [--gpus] [--json out.json]

For every stage 0..3 (plus stage 2 with the optimizer offloaded, and stage 3 with everything
offloaded) and for bf16 and fp32, runs train.py for 2 steps on `--ranks` ranks under the deepspeed
launcher (CPU ranks unless --gpus) and reads the run's memory.json: the bytes of parameters, fp32
master weights, gradients and optimizer state that rank 0 really holds (nanosft/memory.py
finds every live tensor), next to the ZeRO paper's estimate. The ratio column is against stage 0
in the same dtype, measured in the same invocation.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "data"))
from generate import generate, write_jsonl  # noqa: E402

SETUPS = [("0", "none"), ("1", "none"), ("2", "none"), ("2", "optimizer"), ("3", "none"), ("3", "all")]


def run(args, data, stage, offload, dtype, out):
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    env = dict(os.environ)
    if not args.gpus:
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    cmd = [launcher, "--num_gpus", str(args.ranks), "--master_port", "29877", os.path.join(ROOT, "train.py"),
           "--data", data, "--val-data", "", "--eval-data", "", "--out", out, "--steps", "2",
           "--dim", str(args.dim), "--n-layer", str(args.n_layer), "--n-head", str(args.dim // 64), "--n-kv-head",
           str(max(args.dim // 128, 1)), "--vocab-size", "1024", "--batch-size", "2",
           "--zero-stage", stage, "--offload", offload, "--dtype", dtype,
           "--optimizer", "adamw"]  # the ZeRO paper's accounting is for Adam: two moments per weight
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"stage {stage} offload {offload} {dtype} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    with open(os.path.join(out, "memory.json")) as f:
        return json.load(f)


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=8)
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--gpus", action="store_true", help="ranks on GPUs (default: CPU ranks)")
    p.add_argument("--json", default="", help="also write the figures here")
    args = p.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "train.jsonl")
        write_jsonl(data, generate(3000, 0, 0)[0])
        for dtype in args.dtypes.split(","):
            base = None
            for stage, offload in SETUPS:
                rep = run(args, data, stage, offload, dtype, os.path.join(tmp, f"s{stage}{offload}{dtype}"))
                rank0 = rep["per_rank"][0]
                measured = {k: sum(dev.get(k, 0) for dev in rank0.values())
                            for k in ("parameters", "master_weights", "gradients", "optimizer_state", "model_states", "other")}
                on_cpu = rank0.get("cpu", {}).get("model_states", 0)
                base = base or measured["model_states"]
                results.append({"stage": int(stage), "offload": offload, "dtype": dtype, "ranks": args.ranks,
                                "params": rep["params"], "measured": measured, "model_states_on_cpu": on_cpu,
                                "estimate": rep["estimate_per_rank"], "ratio_vs_stage0": measured["model_states"] / base})

    mib = 2 ** 20
    print(f"per-rank bytes on rank 0 of {args.ranks}, {results[0]['params']:,} parameters "
          f"(MiB; model states = parameters + master weights + gradients + optimizer state)")
    print(f"{'dtype':5} {'stage':>5} {'offload':9} {'params':>7} {'master':>7} {'grads':>7} {'optim':>7} "
          f"{'states':>7} {'estimate':>8} {'vs s0':>6} {'other':>8}")
    for r in results:
        m = r["measured"]
        print(f"{r['dtype']:5} {r['stage']:>5} {r['offload']:9} {m['parameters'] / mib:7.2f} {m['master_weights'] / mib:7.2f} "
              f"{m['gradients'] / mib:7.2f} {m['optimizer_state'] / mib:7.2f} {m['model_states'] / mib:7.2f} "
              f"{r['estimate']['model_states'] / mib:8.2f} {r['ratio_vs_stage0']:6.3f} {m['other'] / mib:8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
