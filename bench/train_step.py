"""
Training-step benchmark: nanosft's model against Hugging Face transformers' LlamaForCausalLM with the
same weights, and both against this machine's own matrix-multiply peak.

    .venv/bin/python bench/train_step.py [--configs tiny,d512] [--dtypes fp32,bf16] [--batch 8 --seq 256]
                                         [--rounds 3] [--threads 0] [--json out.json]

One step = forward + loss + backward + AdamW step, on a fixed (batch, seq) block of random token ids
in which every token is supervised, so both models do exactly the same work. Both are driven by the
same plain PyTorch loop below (no DeepSpeed, no Trainer); bf16 means torch.autocast with fp32
weights, the usual mixed-precision recipe on either library. The two models alternate in rounds
within this one process, so a slow moment of the machine hits both; the median round is reported.
Before timing, the script checks that the two models start from the same loss. Both are also run
compiled with torch.compile (nanosft's train.py --compile; --no-compile skips them), and the
compiled pair is compared with each other.

FLOPs per token follow the usual model-FLOPs convention (PaLM, nanoGPT): 6 per weight of every
matrix the token passes through (including the LM head, not the embedding lookup), plus
12 * n_layer * seq * n_head * head_dim for the attention scores and weighted sums, forward and
backward. MFU = achieved FLOP/s / the best FLOP/s of a large square matmul in the same dtype,
measured here at the start of the run. On a machine with CUDA everything runs on the GPU, e.g. the
~124M config in bf16: `bench/train_step.py --configs 124m --dtypes bf16`.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanosft.checkpoint import hf_state_dict  # noqa: E402
from nanosft.hf_config import config_to_hf  # noqa: E402
from nanosft.model import ModelConfig, Transformer  # noqa: E402

# (dim, n_layer, n_head, vocab_size); multi-head attention (n_kv_head = n_head), tied embeddings
CONFIGS = {
    "tiny": (128, 4, 4, 2048),
    "d512": (512, 8, 8, 8192),
    "124m": (768, 12, 12, 50304),
}
STEPS = {"tiny": 12, "d512": 3, "124m": 1}  # steps per round: a round of each takes a few seconds


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype, sizes=None, seconds=1.0):
    """Best FLOP/s of an (n, n) x (n, n) matmul over a few sizes: the ceiling MFU is measured against.
    Through F.linear, the path an nn.Linear takes: on CPUs without bf16 units a plain bf16 `a @ b`
    falls back to a kernel some 20x slower, which would make a poor ceiling."""
    best = 0.0
    for n in sizes or ((1024, 2048, 4096, 8192) if DEVICE.type == "cuda" else (1024, 2048, 4096)):
        a, b = (torch.randn(n, n, dtype=dtype, device=DEVICE) for _ in range(2))
        F.linear(a, b)  # warm-up (first call allocates, and picks the kernel)
        sync()
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(10 if DEVICE.type == "cuda" else 1):
                F.linear(a, b)
                reps += 1
            sync()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def flops_per_token(cfg, seq):
    per_layer = (cfg.dim * cfg.head_dim * (2 * cfg.n_head + 2 * cfg.n_kv_head)  # q, k, v, o
                 + 3 * cfg.dim * cfg.ffn_hidden)  # gate, up, down
    matrices = cfg.n_layer * per_layer + cfg.dim * cfg.vocab_size  # + LM head
    return 6 * matrices + 12 * cfg.n_layer * seq * cfg.n_head * cfg.head_dim


def hf_twin(model):
    """transformers' LlamaForCausalLM holding the weights of our model, on its device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = config_to_hf(model.cfg)
    hf_cfg.pop("torch_dtype")
    hf = LlamaForCausalLM(LlamaConfig(**hf_cfg, attn_implementation="sdpa"))
    missing, unexpected = hf.load_state_dict(hf_state_dict(model.state_dict(), model.cfg), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # a tied head
    hf.tie_weights()
    return hf.to(model.embed_tokens.weight.device)


def build(name, seq, seed=0, vocab=None):
    """-> (nanosft model, transformers model) holding the same weights, in training mode on DEVICE
    (the same seed gives the same weights again, for the compiled copy)."""
    dim, n_layer, n_head, default_vocab = CONFIGS[name]
    cfg = ModelConfig(vocab_size=vocab or default_vocab, dim=dim, n_layer=n_layer, n_head=n_head, n_kv_head=n_head,
                      max_seq_len=seq)
    torch.manual_seed(seed)
    ours = Transformer(cfg).to(DEVICE)
    return ours.train(), hf_twin(ours).train()


def check_same_loss(ours, hf, bf16, what):
    """Stop unless the two models' losses (floats) on the same batch agree: same weights, same maths."""
    if abs(ours - hf) > (2e-2 if bf16 else 1e-4) * abs(hf):
        raise SystemExit(f"{what}: the models disagree before training: loss {ours:.6f} vs {hf:.6f}")


def ours_loss(model, batch):
    idx, targets = batch
    total, count = model(idx, targets=targets, loss_mask=torch.ones_like(targets))
    return total / count


def hf_loss(model, batch):
    idx, targets = batch
    # shift_labels: the targets are already next tokens; transformers would otherwise shift again
    return model(input_ids=idx, labels=targets, shift_labels=targets).loss


def run_steps(model, loss_fn, opt, batches, steps, bf16):
    """`steps` optimizer steps, on the batches in turn, loss_fn(model, batch) each -> the losses (floats)."""
    losses = []
    for i in range(steps):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model, batches[i % len(batches)])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return [float(x) for x in losses]  # one synchronisation at the end, not one per step


def compare(name, dtype, args, peak):
    bf16 = dtype == "bf16"
    ours, hf = build(name, args.seq)
    vocab = ours.cfg.vocab_size
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, vocab, (args.batch, args.seq + 1), generator=g) for _ in range(4)]
    batches = [(r[:, :-1].contiguous().to(DEVICE), r[:, 1:].contiguous().to(DEVICE)) for r in rows]
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
        l0, l1 = ours_loss(ours, batches[0]).item(), hf_loss(hf, batches[0]).item()
    check_same_loss(l0, l1, bf16, f"{name} {dtype}")

    sides = {"nanosft": (ours, ours_loss), "hf": (hf, hf_loss)}
    if args.compile:  # both again with the same weights, compiled (train.py --compile): the first steps compile
        compiled, hf_compiled = build(name, args.seq)
        compiled.compile()
        hf_compiled.compile()
        sides.update(nanosft_compiled=(compiled, ours_loss), hf_compiled=(hf_compiled, hf_loss))
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, (m, _) in sides.items()}
    steps = args.steps or STEPS[name]
    warmup_s = {}
    for k, (m, fn) in sides.items():  # warm-up: allocator, kernel choice, optimizer state, compilation
        t0 = time.perf_counter()
        run_steps(m, fn, opts[k], batches, 2, bf16)
        warmup_s[k] = time.perf_counter() - t0
    seconds = {k: [] for k in sides}
    for _ in range(args.rounds):  # alternate, so that both see the same machine
        for k, (m, fn) in sides.items():
            sync()
            t0 = time.perf_counter()
            run_steps(m, fn, opts[k], batches, steps, bf16)
            seconds[k].append(time.perf_counter() - t0)
    tokens = steps * args.batch * args.seq
    tps = {k: tokens / statistics.median(s) for k, s in seconds.items()}
    fpt = flops_per_token(ours.cfg, args.seq)
    r = {"config": name, "dtype": dtype, "params": ours.num_params(), "batch": args.batch, "seq": args.seq,
         "steps_per_round": steps, "rounds": args.rounds, "initial_loss": l0,
         "nanosft_tokens_per_s": tps["nanosft"], "hf_tokens_per_s": tps["hf"],
         "ratio": tps["nanosft"] / tps["hf"], "flops_per_token": fpt,
         "nanosft_gflops": tps["nanosft"] * fpt / 1e9, "hf_gflops": tps["hf"] * fpt / 1e9,
         "mfu": tps["nanosft"] * fpt / peak, "hf_mfu": tps["hf"] * fpt / peak}
    if args.compile:
        c, hc = tps["nanosft_compiled"], tps["hf_compiled"]
        r.update(compiled_tokens_per_s=c, hf_compiled_tokens_per_s=hc, compiled_ratio=c / hc,
                 compiled_mfu=c * fpt / peak, hf_compiled_mfu=hc * fpt / peak,
                 compile_and_warmup_s=warmup_s["nanosft_compiled"], hf_compile_and_warmup_s=warmup_s["hf_compiled"])
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--configs", default="tiny,d512", help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--dtypes", default="fp32,bf16", help="fp32 and/or bf16 (autocast)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per model; the median is reported")
    p.add_argument("--steps", type=int, default=0, help="steps per round (default: by config, a few seconds)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile'd pair of models (their first steps compile for a while)")
    p.add_argument("--peak-seconds", type=float, default=1.0, help="time per matmul size when measuring the peak")
    p.add_argument("--peak-sizes", default="", help="matmul sizes for the peak, e.g. 512,1024 (default: up to 4096 "
                   "on a CPU, 8192 on a GPU; a CPU without bf16 units takes minutes for a bf16 4096 matmul)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--json", default="", help="also write the figures here")
    args = p.parse_args()
    configs, dtypes = args.configs.split(","), args.dtypes.split(",")
    for c in configs:
        if c not in CONFIGS:
            p.error(f"unknown config {c!r}; choose from {', '.join(CONFIGS)}")
    for d in dtypes:
        if d not in ("fp32", "bf16"):
            p.error(f"unknown dtype {d!r}; choose fp32 or bf16")
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "transformers": transformers.__version__,
               "gpu": torch.cuda.get_device_name() if DEVICE.type == "cuda" else None}
    try:
        with open("/proc/cpuinfo") as f:
            machine["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    sizes = [int(n) for n in args.peak_sizes.split(",")] if args.peak_sizes else None
    peaks = {d: matmul_peak(torch.float32 if d == "fp32" else torch.bfloat16, sizes, args.peak_seconds) for d in dtypes}
    print(f"{machine['gpu'] or machine['cpu'] + ', ' + str(machine['threads']) + ' threads'}, torch {machine['torch']}, "
          f"transformers {machine['transformers']}; batch {args.batch} x {args.seq}, AdamW")
    print("matmul peak: " + ", ".join(f"{d} {v / 1e9:.0f} GFLOP/s" for d, v in peaks.items()))
    print(f"\n{'':22} {'eager':^45}" + (f"  {'compiled (torch.compile)':^45}" if args.compile else ""))
    head = f"{'nanosft tok/s':>13} {'hf tok/s':>9} {'ratio':>6} {'MFU':>5} {'hf MFU':>7}"
    print(f"{'config':8} {'dtype':5} {'params':>7} {head}" + (f"  {head}" if args.compile else ""))
    results = []
    for c in configs:
        for d in dtypes:
            r = compare(c, d, args, peaks[d])
            results.append(r)
            line = (f"{c:8} {d:5} {r['params'] / 1e6:6.1f}M {r['nanosft_tokens_per_s']:13,.0f} "
                    f"{r['hf_tokens_per_s']:9,.0f} {r['ratio']:5.2f}x {r['mfu']:5.0%} {r['hf_mfu']:7.0%}")
            if args.compile:
                line += (f"  {r['compiled_tokens_per_s']:13,.0f} {r['hf_compiled_tokens_per_s']:9,.0f} "
                         f"{r['compiled_ratio']:5.2f}x {r['compiled_mfu']:5.0%} {r['hf_compiled_mfu']:7.0%}")
            print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "matmul_peak_flops": peaks, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
