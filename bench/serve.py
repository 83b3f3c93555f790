"""
Serving benchmark: aggregate decode tokens/s of `python -m nanosft.serve` at 1, 4 and 16 concurrent
streams, against transformers' batched `generate` on the same weights and batch, then a load of 32
clients x 4 requests with its latencies.

    .venv/bin/python bench/serve.py [--ckpt runs/latest] [--tokens 128 --short 32] [--repeats 3] [--json out.json]

The server runs as its own process on 127.0.0.1 (a free port), as a user would start it, with its
default threads (all cores but one); the clients are threads here, speaking HTTP with the standard
library (lighter than the openai client, so that the cores go to the server). A throughput run is N
streamed requests at once, each asking for exactly --tokens greedy tokens (ignore_eos), timed from
the first request sent to the last [DONE]. "whole" is N x tokens / that time; "decode" subtracts the
time of the same run with --short tokens: N x (tokens - short) / (t_tokens - t_short), the rate of
the decode steps alone, without what both runs pay once (connections, parsing, prefill). Each time
is the median of --repeats. transformers: LlamaForCausalLM holding the same weights
(bench/train_step.py's hf_twin) and the same threads, generate() on a batch of the same N prompts
(one length, no padding), greedy, exactly that many new tokens, in this process with the server
stopped, timed and reported the same way. Load: 32 clients each send 4 held-out prompts one after
another (128 requests, normal replies that end at the end token), streamed; latency = request to
[DONE], time to first token = request to the first piece of text; every reply is checked against
the same prompt asked alone beforehand. Targets: decode at 16 streams >= 4x one stream, and >= 1.0x
transformers' generate at 16.
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
from nanosft.checkpoint import load_model  # noqa: E402
from nanosft.data import load_jsonl  # noqa: E402
from nanosft.evaluate import check_eval_record  # noqa: E402
from nanosft.serve import server_threads  # noqa: E402
from nanosft.template import ChatTemplate  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt, port, slots, threads):
    p = subprocess.Popen([sys.executable, "-m", "nanosft.serve", "--ckpt", ckpt, "--port", str(port), "--slots",
                          str(slots), "--threads", str(threads), "--quiet"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return p
        except OSError:
            time.sleep(0.2)
        if p.poll() is not None:
            sys.exit(f"error: the server did not start: {p.stderr.read().decode()}")
    p.kill()
    sys.exit("error: the server did not answer /health within 2 minutes")


def stream(port, messages, max_tokens, ignore_eos=False):
    """One streamed request -> (text, seconds to the first text, seconds to [DONE])."""
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    body = json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "ignore_eos": ignore_eos})
    c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]}")
    text, first = [], None
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        if line == b"data: [DONE]":
            break
        delta = json.loads(line[6:])["choices"]
        piece = delta[0]["delta"].get("content") if delta else None
        if piece:
            text.append(piece)
            first = first or time.perf_counter() - t0
    c.close()
    return "".join(text), first, time.perf_counter() - t0


def server_seconds(port, prompts, n, tokens, repeats):
    """Median seconds for n streams at once, each exactly `tokens` tokens."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(lambda m: stream(port, m, tokens, ignore_eos=True), prompts[:n]))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hf_seconds(hf, prompt_ids, n, tokens, repeats):
    """Median seconds of transformers' generate for a batch of n copies of one prompt, `tokens` new tokens."""
    ids = torch.tensor([prompt_ids] * n)
    times = []
    with torch.inference_mode():
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                              do_sample=False, pad_token_id=0)
            times.append(time.perf_counter() - t0)
            assert out.shape[1] == len(prompt_ids) + tokens
    return statistics.median(times)


def rates(seconds, n, tokens, short):
    """-> (whole replies' tokens/s, decode tokens/s): the second from the difference between replies of
    `tokens` and of `short` tokens, so that what both pay once (connection, prefill) cancels out;
    None when the difference drowns in noise (a tiny --tokens - --short)."""
    long, brief = seconds(tokens), seconds(short)
    return n * tokens / long, n * (tokens - short) / (long - brief) if long > brief else None


def load_test(port, conversations, clients=32, per_client=4, max_tokens=64):
    """32 clients x 4 requests at once -> (latencies, first-token times, replies in request order: None
    for a request that failed)."""
    def ask(i):
        try:
            return stream(port, conversations[i], max_tokens)
        except (OSError, RuntimeError, ValueError) as e:  # counted as unanswered, not a crash of the bench
            print(f"request {i} failed: {e}", file=sys.stderr)
            return None, None, None

    def one_client(c):
        return [ask(c * per_client + j) for j in range(per_client)]
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(one_client, range(clients)) for r in rs]
    return ([r[2] for r in results if r[2] is not None], [r[1] for r in results if r[1] is not None],
            [r[0] for r in results])


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--ckpt", default="runs/latest")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per stream in the throughput runs")
    p.add_argument("--short", type=int, default=32, help="the shorter replies whose time is subtracted (decode rate)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eval-data", default="data/eval.jsonl", help="held-out prompts for the load test")
    p.add_argument("--threads", type=int, default=0, help="torch threads of the server and of transformers "
                   "(default: the server's own choice, all cores but one)")
    p.add_argument("--json", default="")
    args = p.parse_args()
    torch.set_num_threads(args.threads or server_threads())
    from train_step import hf_twin  # transformers: a test and benchmark dependency

    model, tok = load_model(args.ckpt)
    template = ChatTemplate(tok)
    records = load_jsonl(os.path.join(ROOT, args.eval_data), check_eval_record)
    fit = [r["messages"] for r in records if len(template.render_prompt(r["messages"])) < model.cfg.max_seq_len]
    conversations = [fit[i % len(fit)] for i in range(128)]  # (a short file: some twice)
    # throughput prompts: one length, so transformers' batch needs no padding (the server would not care)
    same = [[{"role": "user", "content": f"Repeat after me: {w} {w} {w}."}] for w in "abcdefghijklmnop"]
    lengths = {len(template.render_prompt(m)) for m in same}
    assert len(lengths) == 1, lengths
    prompt_len = lengths.pop()
    if not 0 < args.short < args.tokens:
        sys.exit("error: --short must be between 0 and --tokens")
    if prompt_len + args.tokens > model.cfg.max_seq_len:
        sys.exit(f"error: --tokens {args.tokens} + a {prompt_len}-token prompt exceed the context {model.cfg.max_seq_len}")

    port = free_port()
    server = start_server(args.ckpt, port, 32, torch.get_num_threads())
    out = {"ckpt": args.ckpt, "tokens": args.tokens, "short": args.short, "threads": torch.get_num_threads(),
           "cpu": cpu_name()}
    try:
        out["server"] = {n: rates(lambda t: server_seconds(port, same, n, t, args.repeats), n, args.tokens, args.short)
                         for n in (1, 4, 16)}
        alone = [stream(port, m, 64)[0] for m in conversations]  # each prompt by itself, first
        latencies, firsts, replies = load_test(port, conversations)
        out["load"] = {"requests": len(replies), "all_answered": all(r is not None for r in replies),
                       "same_as_alone": sum(a == b for a, b in zip(alone, replies)),
                       "latency_p50_s": pct(latencies, 0.5), "latency_p95_s": pct(latencies, 0.95),
                       "first_token_p50_s": pct(firsts, 0.5), "first_token_p95_s": pct(firsts, 0.95)}
    finally:
        server.terminate()
        server.wait()
    hf = hf_twin(model).eval()
    prompt = template.render_prompt(same[0])
    out["transformers"] = {n: rates(lambda t: hf_seconds(hf, prompt, n, t, args.repeats), n, args.tokens, args.short)
                           for n in (1, 4, 16)}
    s, h = out["server"], out["transformers"]
    measured = all(r[1] for r in [*s.values(), *h.values()])
    out["decode_16_vs_1"] = s[16][1] / s[1][1] if measured else None
    out["decode_vs_transformers_at_16"] = s[16][1] / h[16][1] if measured else None
    out["whole_vs_transformers_at_16"] = s[16][0] / h[16][0]

    print(f"{args.ckpt}: {model.num_params():,} parameters; {out['cpu']}, {out['threads']} threads; "
          f"{args.tokens} greedy tokens per stream, median of {args.repeats}")
    print(f"\n{'streams':>8} {'server decode tok/s':>20} {'transformers decode':>20} {'server whole':>13} "
          f"{'transformers whole':>19}")
    for n in (1, 4, 16):
        print(f"{n:8} {s[n][1] or float('nan'):20.0f} {h[n][1] or float('nan'):20.0f} {s[n][0]:13.0f} {h[n][0]:19.0f}")
    ld = out["load"]
    if measured:
        print(f"\ndecode, 16 streams vs 1: {out['decode_16_vs_1']:.2f}x (target >= 4); server vs transformers' "
              f"generate at 16: {out['decode_vs_transformers_at_16']:.2f}x decode (target >= 1.0), "
              f"{out['whole_vs_transformers_at_16']:.2f}x whole replies")
    else:
        print("\ndecode rates: a longer reply took no longer than a shorter one; raise --tokens above --short")
    print(f"load, 32 clients x 4 requests: {ld['requests']} answered, {ld['same_as_alone']} identical to the prompt "
          f"asked alone; latency p50 {ld['latency_p50_s']:.2f} s, p95 {ld['latency_p95_s']:.2f} s; first token p50 "
          f"{ld['first_token_p50_s']:.2f} s, p95 {ld['first_token_p95_s']:.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


if __name__ == "__main__":
    main()
