"""
The GPU check: every path that only a GPU takes, run once, in one table (and JSON).

    make gpu-check                 (python3 bench/gpu_check.py [--json runs/gpu-check/gpu_check.json])

Runs with the Python that already holds CUDA PyTorch (`python3`, never the project's .venv with
its CPU wheel), DeepSpeed installed beside it from a wheel made beforehand (README, "On a GPU"),
and no internet. In order, each a separate process, each reported even when an earlier one failed:

  data          the default data (data/generate.py)
  bf16          the default run (`make train`), bf16: time, tokens/s, held-out exact match
  fp16          the same in fp16: dynamic loss scaling, its final scale and the steps it skipped
  zero2, zero3  200 steps under the deepspeed launcher on every visible GPU, ZeRO-2 and ZeRO-3
  compile       200 steps with --compile (tokens/s against the bf16 run's)
  train_step    bench/train_step.py at ~124M parameters, bf16: tokens/s and MFU against this GPU's
                measured bf16 matmul peak, and against transformers' LlamaForCausalLM
  decode        bench/generate.py on the bf16 run's model: greedy tokens/s with the KV cache

About 5-8 minutes on one GPU (--only runs some of them). On a machine without a CUDA GPU it stops
at once, saying so.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def preflight():
    """-> a description of the GPUs, or exit 1 with the reason this machine cannot run the check."""
    try:
        import torch
    except ImportError:
        raise SystemExit("gpu-check: no PyTorch in this Python; run it with the Python that holds CUDA PyTorch")
    if not torch.cuda.is_available():
        why = "this PyTorch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise SystemExit(f"gpu-check: needs a CUDA GPU, and {why} (torch {torch.__version__}). "
                         "Run `make gpu-check` on a GPU machine (README, \"On a GPU\").")
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"gpu-check: DeepSpeed does not import beside this PyTorch ({e}); install it and its needs "
                         "from wheels made beforehand (README, \"On a GPU\"), without replacing torch")
    try:
        import transformers  # noqa: F401  (bench/train_step.py's reference model)
    except ImportError as e:
        raise SystemExit(f"gpu-check: transformers does not import ({e}); the train_step check compares with it")
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"gpus": names, "torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__}


def run(cmd, timeout):
    """Run one check's command from the repository root -> (seconds, None or the error's tail)."""
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return time.time() - t0, f"did not finish in {timeout} s"
    return time.time() - t0, (None if r.returncode == 0 else (r.stdout + r.stderr)[-1500:])


def train_run(out, *flags, launcher=None):
    return (launcher or [sys.executable]) + [os.path.join(ROOT, "train.py"), "--out", out, *flags]


def load(path):
    with open(path) as f:
        return json.load(f)


def metrics_of(run_dir):
    from nanosft.monitor import read_monitor
    m = load(os.path.join(run_dir, "metrics.json"))
    scale = read_monitor(run_dir).get("Train_loss_scale", {})
    return {"wall_s": m["wall_time_s"], "tokens_per_s": m["train_tokens_per_s"], "steps": m["steps"],
            "skipped_steps": m["skipped_steps"], "exact_match": m["exact_match"].get("overall"),
            "final_loss_scale": scale[max(scale)] if scale else None, "val_loss": m["val_loss"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu-check"), help="run directories go here")
    p.add_argument("--json", default="", help="the table as JSON (default: OUT/gpu_check.json)")
    p.add_argument("--steps", type=int, default=200, help="steps of the ZeRO and compile runs")
    p.add_argument("--only", default="", help="run only these checks, e.g. data,bf16,decode (default: all; "
                                                "decode reads bf16's run)")
    args = p.parse_args()
    machine = preflight()
    import torch
    n_gpus = torch.cuda.device_count()
    print(f"gpu-check: {n_gpus} x {machine['gpus'][0]}, torch {machine['torch']} (CUDA {machine['cuda']}), "
          f"deepspeed {machine['deepspeed']}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    out = lambda name: os.path.join(args.out, name)  # noqa: E731
    short = ["--steps", str(args.steps), "--eval-data", ""]
    launcher = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(n_gpus)]
    if not os.path.exists(launcher[0]):  # deepspeed installed with --target: its launcher is a module
        launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(n_gpus)]
    bench_json = lambda name: out(f"{name}.json")  # noqa: E731
    checks = [
        ("data", [sys.executable, os.path.join(ROOT, "data", "generate.py")], 120, dict),  # (the default data)
        ("bf16", train_run(out("bf16"), "--dtype", "bf16"), 240, lambda: metrics_of(out("bf16"))),
        ("fp16", train_run(out("fp16"), "--dtype", "fp16"), 240, lambda: metrics_of(out("fp16"))),
        ("zero2", train_run(out("zero2"), "--zero-stage", "2", *short, launcher=launcher), 180,
         lambda: metrics_of(out("zero2"))),
        ("zero3", train_run(out("zero3"), "--zero-stage", "3", *short, launcher=launcher), 180,
         lambda: metrics_of(out("zero3"))),
        ("compile", train_run(out("compile"), "--compile", *short), 240, lambda: metrics_of(out("compile"))),
        ("train_step", [sys.executable, os.path.join(ROOT, "bench", "train_step.py"), "--configs", "124m",
                             "--dtypes", "bf16", "--rounds", "3", "--json", bench_json("train_step")], 300,
         lambda: {k: v for k, v in load(bench_json("train_step"))["results"][0].items()
                  if k in ("nanosft_tokens_per_s", "hf_tokens_per_s", "ratio", "mfu", "hf_mfu", "compiled_mfu")}),
        ("decode", [sys.executable, os.path.join(ROOT, "bench", "generate.py"), "--ckpt", out("bf16"),
                    "--prompt-tokens", "16,128", "--new-tokens", "96",
                    "--no-hf", "--json", bench_json("generate")], 120,
         lambda: {f"prompt {r['prompt_tokens']} tok/s": r["kv_cache"]["tokens_per_s"]
                  for r in load(bench_json("generate"))["runs"]}),
    ]
    rows = []
    for name, cmd, timeout, read in checks:
        if args.only and name not in args.only.split(","):
            continue
        seconds, error = run(cmd, timeout)
        row = {"check": name, "ok": error is None, "seconds": round(seconds, 1)}
        try:
            row.update(read() if error is None else {"error": error})
        except (OSError, KeyError, ValueError, IndexError) as e:
            row.update(ok=False, error=f"ran, but its figures could not be read: {e}")
        rows.append(row)
        figures = ", ".join(f"{k} {v:,.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                            if k not in ("check", "ok", "seconds", "error"))
        last = (row.get("error") or "").strip().splitlines()[-1:]  # the error's last line, if any
        print(f"{name:10} {'ok' if row['ok'] else 'FAILED':6} {seconds:6.0f}s  {figures or ''.join(last)}", flush=True)
    path = args.json or out("gpu_check.json")
    with open(path, "w") as f:
        json.dump({"machine": machine, "checks": rows}, f, indent=2)
    print(f"gpu-check: {sum(r['ok'] for r in rows)} of {len(rows)} checks ok; figures in {path}")
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
