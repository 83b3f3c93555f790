"""train.py promises: wrapping the model in deepspeed.initialize changes nothing about the maths (a
single-rank fp32 run equals a plain PyTorch loop step for step, including gradient accumulation
normalised by the supervised tokens of the whole batch), a run directory holds what chat.py and
users rely on, and a malformed data file stops the run with file, line and reason.

These start real training processes, so they are marked slow (still part of `make test`)."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "data"))
from generate import generate, write_jsonl  # noqa: E402  (data/generate.py)

from nanosft.data import epoch_rows, load_jsonl, to_batch, tokenize
from nanosft.evaluate import check_eval_record
from nanosft.loss import masked_nll
from nanosft.model import ModelConfig, Transformer
from nanosft.template import ChatTemplate
from nanosft.tokenizer import Tokenizer

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dim", "32", "--n-layer", "2", "--n-head", "4", "--n-kv-head", "2", "--vocab-size", "300",
        "--max-seq-len", "128", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-2", "--warmup-steps", "2",
        "--seed", "7"]


def run_train(*args, cwd=ROOT):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    train, val, evals = generate(300, 40, 20, seed=3)
    for name, recs in (("train", train), ("val", val), ("eval", evals)):
        write_jsonl(d / f"{name}.jsonl", recs)
    out = d / "runs" / "tiny"
    r = run_train("--data", str(d / "train.jsonl"), "--val-data", str(d / "val.jsonl"),
                  "--eval-data", str(d / "eval.jsonl"), "--out", str(out), "--steps", "5", "--dtype", "fp32", *TINY)
    assert r.returncode == 0, r.stdout + r.stderr
    return d, out


def reference_weights(data_dir, steps=5, seed=7, batch=2, accum=2, lr=1e-2, warmup=2):
    """The same training written as a plain PyTorch loop, no DeepSpeed."""
    records = load_jsonl(data_dir / "train.jsonl")
    tok = Tokenizer.train([m["content"] for r in records for m in r["messages"]], 300)
    samples, _ = tokenize(records, ChatTemplate(tok), 129)
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layer=2, n_head=4, n_kv_head=2, ffn_hidden=96, max_seq_len=128)
    model = Transformer(cfg)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.0},
                             {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else
                                              0.1 + 0.45 * (1 + math.cos(math.pi * min((s - warmup) / (steps - warmup), 1))))
    rows, cursor = epoch_rows(samples, 129, tok.pad_id, seed, 0), 0
    for _ in range(steps):
        micro = [to_batch(rows, slice(cursor + i * batch, cursor + (i + 1) * batch)) for i in range(accum)]
        cursor += accum * batch
        # the loss of the whole step: every supervised token of all micro-batches weighs the same
        total = sum(masked_nll(model(b["idx"], pos=b["pos"], doc=b["doc"]), b["targets"], b["loss_mask"])[0] for b in micro)
        loss = total / sum(b["loss_mask"].sum() for b in micro)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return model.state_dict()


def test_single_rank_deepspeed_run_equals_plain_pytorch_loop(tiny_run):
    data_dir, out = tiny_run
    ours = torch.load(out / "model.pt", weights_only=True)
    ref = reference_weights(data_dir)
    assert ours.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)
    # and training moved the weights at all
    torch.manual_seed(7)
    assert not torch.allclose(ours["layers.0.mlp.up_proj.weight"], Transformer(ModelConfig(vocab_size=300, dim=32, n_layer=2, n_head=4, n_kv_head=2, ffn_hidden=96)).state_dict()["layers.0.mlp.up_proj.weight"])


def test_run_directory_has_weights_tokenizer_config_metrics_and_log(tiny_run):
    _, out = tiny_run
    for f in ("model.pt", "config.json", "tokenizer.model", "ds_config.json", "metrics.json", "train_log.csv"):
        assert (out / f).exists(), f
    m = json.loads((out / "metrics.json").read_text())
    for k in ("val_loss", "val_ppl", "exact_match", "train_tokens_per_s", "wall_time_s"):
        assert k in m, k
    assert math.isclose(m["val_ppl"], math.exp(m["val_loss"]), rel_tol=1e-9)
    assert set(m["exact_match"]) == {"recall", "copy", "max", "count", "overall"}
    with open(out / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    tokens = [int(r["tokens"]) for r in rows]
    assert all(b > a for a, b in zip(tokens, tokens[1:]))  # cumulative
    assert {"step", "loss", "lr", "tokens"} <= set(rows[0])
    assert os.path.realpath(out.parent / "latest") == str(out)
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 4 and ds["gradient_accumulation_steps"] == 2


def test_malformed_jsonl_stops_with_file_line_and_reason(tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    bad.write_text(good + "\n" + good + "\n" + '{"messages": [{"role": "user", "content": "hi"},' + "\n")
    r = run_train("--data", str(bad), "--out", str(tmp_path / "run"), "--steps", "1", *TINY)
    assert r.returncode != 0
    assert f"{bad}:3: invalid JSON" in r.stderr
    assert "Traceback" not in r.stderr


def test_chat_batch_answers_every_line_in_order_and_matches_evaluation(tiny_run):
    from nanosft.checkpoint import load_run
    from nanosft.generate import reply
    data_dir, out = tiny_run
    recs = load_jsonl(data_dir / "eval.jsonl", check_eval_record)[:6]
    inp = data_dir / "prompts.jsonl"
    inp.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in recs))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "chat.py"), "--ckpt", str(out), "--batch", str(inp)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(l) for l in r.stdout.splitlines()]
    model, tok = load_run(out)
    assert lines == [{"reply": reply(model, ChatTemplate(tok), rec["messages"], 128)} for rec in recs]


def test_chat_without_a_trained_run_says_how_to_train_one(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "chat.py"), "--ckpt", str(tmp_path / "nothing"),
                        "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "make train" in r.stderr and "Traceback" not in r.stderr
