"""Shared by the tests that start real processes: a tiny training run on generated data, made once
per test session (test_train.py checks it, test_chat.py talks to it)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "data"))
from generate import generate, write_jsonl  # noqa: E402  (data/generate.py)

# a model small enough to train in seconds; every flag spelled out so tests can rebuild it
TINY = ["--dim", "32", "--n-layer", "2", "--n-head", "4", "--n-kv-head", "2", "--vocab-size", "300",
        "--max-seq-len", "128", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-2", "--warmup-steps", "2",
        "--seed", "7"]
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def run(cmd, **kw):
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **kw)


def run_train(*args):
    return run([sys.executable, os.path.join(ROOT, "train.py"), *args])


def run_chat(*args, **kw):
    return run([sys.executable, os.path.join(ROOT, "chat.py"), *args], **kw)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    train, val, evals = generate(300, 40, 20, seed=3)
    for name, recs in (("train", train), ("val", val), ("eval", evals)):
        write_jsonl(d / f"{name}.jsonl", recs)
    return d


@pytest.fixture(scope="session")
def tiny_run(tiny_data):
    """(data dir, run dir) of a 5-step single-process fp32 run."""
    out = tiny_data / "runs" / "tiny"
    r = run_train("--data", str(tiny_data / "train.jsonl"), "--val-data", str(tiny_data / "val.jsonl"),
                  "--eval-data", str(tiny_data / "eval.jsonl"), "--out", str(out), "--steps", "5",
                  "--dtype", "fp32", *TINY)
    assert r.returncode == 0, r.stdout + r.stderr
    return tiny_data, out
