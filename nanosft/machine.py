"""
What this machine is good at, measured rather than assumed: the dtype to train in, and how many
threads to train and to decode with. CPUs differ: an Intel Sapphire Rapids multiplies bf16 with AMX
several times faster than fp32, an AMD EPYC without AVX-512 runs bf16 many times slower. So does
their load: on 2 cores shared with other work, two threads that wait for each other run a training
step slower than one, and greedy decoding of a small model (hundreds of tiny operations a token)
several times slower. Each choice times the real work both ways for a fraction of a second and
keeps the faster; train.py, chat.py and evaluate.py say what was chosen and why.

    dtype, why = pick_dtype("auto", device, dim)        # ("fp32", "bf16 matmuls measured 9.6x slower")
    n, times = fastest_threads(lambda: model(x))        # (1, {1: 0.041, 2: 0.120}) seconds a call
    n, times = decoding_threads(model)                  # the same for greedy decoding with the KV cache
"""

import os
import platform
import time

import torch
import torch.nn.functional as F

from nanosft.generate import generate

CORES = torch.get_num_threads()  # torch's default (the physical cores, or OMP_NUM_THREADS), read before any change


def best_time(fn, repeats=3):
    """Seconds of the fastest of `repeats` calls, after one warm-up call (which allocates and
    picks kernels)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def pick_dtype(name, device, dim=128):
    """--dtype: `name` unless "auto" -> (dtype, why). auto on a GPU: bf16 where supported, else
    fp16 (DeepSpeed scales the loss). On a CPU: bf16 only if a matmul of the model's width
    measures clearly faster in bf16 than in fp32 (fp16 has no CPU training in DeepSpeed)."""
    if name != "auto":
        return name, "as asked"
    if device.type == "cuda":
        # not emulated bf16 (older GPUs, e.g. V100, T4): fp16 runs there at full speed
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16", "the GPU has bf16"
        return "fp16", "the GPU has no bf16"
    x, w = torch.randn(2048, dim), torch.randn(3 * dim, dim)  # (tokens, C) x (3C, C): a q/k/v projection
    xb, wb = x.bfloat16(), w.bfloat16()
    ratio = best_time(lambda: F.linear(x, w)) / best_time(lambda: F.linear(xb, wb))  # > 1: bf16 faster
    # bf16 training also converts and keeps fp32 master weights: worth it only for a clear gain
    if ratio >= 1.5:
        return "bf16", f"bf16 matmuls measured {ratio:.1f}x faster than fp32 here"
    return "fp32", f"bf16 matmuls measured {1 / ratio:.1f}x slower than fp32 here" if ratio < 1 else \
        f"bf16 matmuls measured only {ratio:.1f}x faster than fp32 here"


def fastest_threads(fn, candidates=None, repeats=4):
    """Time fn with 1 thread and with all the cores, keep the faster count set. -> (threads,
    {threads: seconds a call, the best of `repeats`}). The counts take turns, so that a moment of
    other load on the machine does not fall on one of them only. With OMP_NUM_THREADS set, that is
    the choice, not measured."""
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads(), {}
    candidates = candidates or sorted({1, CORES})
    times = {n: float("inf") for n in candidates}
    for turn in range(repeats + 1):
        for n in candidates:
            torch.set_num_threads(n)
            t = time.perf_counter()
            fn()
            if turn:  # the first turn is a warm-up: it allocates and picks kernels
                times[n] = min(times[n], time.perf_counter() - t)
    best = min(times, key=times.get)
    torch.set_num_threads(best)
    return best, times


@torch.inference_mode()
def decoding_threads(model, steps=16):
    """fastest_threads for greedy decoding with the KV cache: a short prompt, `steps` new tokens."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        return torch.get_num_threads(), {}
    return fastest_threads(lambda: list(generate(model, [0] * 8, steps)))


def training_threads(model, rows, T):
    """fastest_threads for a forward pass of `rows` random rows of T tokens, at most 512 of them (no
    gradients: the training state stays as it was). Longer probe rows would be one causal
    attention over all T tokens, minutes at 100k, where training's packed rows attend within
    their conversations."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        return torch.get_num_threads(), {}
    idx = torch.randint(0, model.cfg.vocab_size, (rows, min(T, 512)), device=device)
    with torch.no_grad():
        return fastest_threads(lambda: model(idx))


def choose_threads(model, rows, T, forced=0, world=1, decodes=True):
    """train.py's threads -> (for training, for decoding, a line saying why). forced: --threads.
    With several ranks on one machine each keeps torch's default (the launcher's business).
    decodes: False for a model that never generates (a reward model): only training is measured."""
    if forced or world > 1:
        torch.set_num_threads(forced or torch.get_num_threads())
        n = torch.get_num_threads()
        return n, n, f"{n} thread{'s' if n > 1 else ''}" + (" (--threads)" if forced else " per rank")
    train = training_threads(model, rows, T)
    torch.set_num_threads(train[0])
    if not decodes:
        return train[0], train[0], f"training on {why_threads(*train)}"
    decode = decoding_threads(model)
    return train[0], decode[0], f"training on {why_threads(*train)}, decoding on {why_threads(*decode)}"


def why_threads(n, times):
    """(2, {1: 0.2, 2: 0.1}) -> "2 threads (1 thread: 2.0x slower)"."""
    others = ", ".join(f"{k} thread{'s' if k > 1 else ''}: {t / times[n]:.1f}x slower" for k, t in times.items() if k != n)
    how = others or ("one core" if times else "OMP_NUM_THREADS or --threads")
    return f"{n} thread{'s' if n > 1 else ''} ({how})"


class using_threads:
    """with using_threads(n): torch runs on n threads inside, on as many as before after."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def free_memory(device):
    """-> (bytes one rank may use, what they are): the GPU's free memory, or on CPU the memory
    the kernel says is available (MemAvailable) shared among the ranks on this machine (LOCAL_SIZE,
    set by the deepspeed launcher; torchrun's LOCAL_WORLD_SIZE). None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"GPU {device.index or 0}'s free memory"
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    ranks = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)  # deepspeed's, torchrun's
    return kib * 1024 // ranks, "this machine's available memory" + (f" / {ranks} ranks" if ranks > 1 else "")
