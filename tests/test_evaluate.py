"""evaluate.py promises: validation loss and perplexity are token-weighted over every supervised
token of the set (not a mean of batch means), exactly exp(sum NLL / tokens) computed by hand with
PyTorch's cross-entropy; generation metrics are greedy replies scored by exact match per family and
corpus BLEU; held-out prompts come from data/eval.jsonl's format or from conversations in any
training format; `python -m nanosft.evaluate` on a saved run gives the numbers training reported."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

from nanosft import evaluate
from nanosft.bleu import corpus_bleu
from nanosft.checkpoint import load_model
from nanosft.data import fill_rows
from nanosft.evaluate import (generation_metrics, load_held_out, loss_and_ppl, pick_samples, shown_width, table,
                              validation_loss)
from nanosft.model import ModelConfig, Transformer
from nanosft.template import ChatTemplate


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=50, dim=32, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=64)).eval()


def continuation(model, start, n, pick):
    """start + n tokens, each the model's pick(logits) at the last position: argmax gives text the
    model finds likely (low loss), argmin text it finds absurd (high loss)."""
    ids = list(start)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(pick(model(torch.tensor([ids]))[0, -1])))
    return ids


def test_perplexity_is_token_weighted_not_a_mean_of_batch_means():
    model = tiny_model()
    likely = continuation(model, [1, 2], 3, torch.argmax)  # a batch with 3 supervised tokens, low loss
    absurd = continuation(model, [3, 4], 40, torch.argmin)  # a batch with 40 supervised tokens, high loss
    samples = [(np.array(s), np.array([0, 0] + [1] * (len(s) - 2))) for s in (likely, absurd)]
    packed = fill_rows([[samples[0]], [samples[1]]], 64, pad_id=0)  # one conversation per row

    total, count = validation_loss(model, packed, batch_size=1)  # one row per batch: two uneven batches
    loss, ppl = loss_and_ppl(total, count)

    nll, means = [], []  # by hand, with F.cross_entropy on each sequence alone
    for s in (likely, absurd):
        with torch.no_grad():
            logits = model(torch.tensor([s[:-1]]))[0]  # (T-1, V)
        per_token = F.cross_entropy(logits[1:], torch.tensor(s[2:]), reduction="none")  # supervised tokens only
        nll.append(per_token)
        means.append(per_token.mean().item())
    nll = torch.cat(nll)
    assert count == len(nll) == 3 + 40
    assert math.isclose(loss, nll.sum().item() / len(nll), rel_tol=1e-5)
    assert math.isclose(ppl, math.exp(nll.sum().item() / len(nll)), rel_tol=1e-5)
    mean_of_means = sum(means) / 2  # what DeepSpeed-Chat reports
    assert abs(mean_of_means - loss) > 0.1  # the 3-token batch would count as much as the 40-token one


def test_nothing_to_score_is_nan_not_an_error():
    assert all(math.isnan(x) for x in loss_and_ppl(0.0, 0))


@pytest.mark.slow
def test_generation_metrics_are_exact_match_per_family_and_corpus_bleu(tiny_run, monkeypatch):
    data_dir, out = tiny_run
    model, tok = load_model(out)
    template = ChatTemplate(tok)
    records = [r for r in load_held_out(data_dir / "eval.jsonl") if r["family"] != "recall_zh"][:12]
    scores, replies = generation_metrics(model, template, records, max_new_tokens=16)
    # the reference: the same replies scored by hand
    for fam in {r["family"] for r in records}:
        mine = [(out, r) for out, r in zip(replies, records) if r["family"] == fam]
        assert scores["exact_match"][fam] == sum((o or "").strip() == r["answer"] for o, r in mine) / len(mine)
    assert scores["bleu"] == corpus_bleu([o or "" for o in replies], [r["answer"] for r in records])
    assert scores["bleu_tokenize"] == "13a"  # no Chinese in the references

    # a reference answer that is the model's own reply is a hit; a prompt too long for the context a miss
    fixed = [dict(r, answer=o.strip(), family="own") for r, o in zip(records[:3], replies)]
    too_long = {"family": "long", "messages": [{"role": "user", "content": "word " * 500}], "answer": "x"}
    scores, replies = generation_metrics(model, template, fixed + [too_long], max_new_tokens=16)
    assert scores["exact_match"] == {"long": 0.0, "own": 1.0, "overall": 0.75} and replies[-1] is None

    # by default a reply may run 16 tokens past its own reference, not past the longest one
    limits = []
    monkeypatch.setattr(evaluate, "greedy_replies",
                        lambda model, template, conversations, limit: limits.extend(limit) or [""] * len(limit))
    generation_metrics(model, template, records)
    assert limits == [len(tok.encode(r["answer"])) + 16 for r in records] and len(set(limits)) > 1
    monkeypatch.undo()

    # Chinese references are scored with sacrebleu's zh tokenization, a token per character
    chinese = [dict(r, answer="你好，我叫小明。") for r in records[:4]]
    scores, replies = generation_metrics(model, template, chinese, max_new_tokens=16)
    assert scores["bleu_tokenize"] == "zh"
    assert scores["bleu"] == corpus_bleu([o or "" for o in replies], [r["answer"] for r in chinese], "zh")


def test_held_out_prompts_come_from_eval_records_or_any_conversation_format(tmp_path):
    path = tmp_path / "held.jsonl"
    lines = [{"family": "max", "messages": [{"role": "user", "content": "Which is larger, 3 or 5?"}], "answer": "5"},
             {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"}]},
             {"instruction": "Repeat after me: tea", "input": "", "output": "tea"}]
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    recs = load_held_out(path)
    assert [r["answer"] for r in recs] == ["5", "你好！", "tea"]
    assert recs[1]["messages"] == [{"role": "user", "content": "你好"}] and recs[2]["family"] == "all"

    path.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=f"{path}:2: the conversation ends with a user turn"):
        load_held_out(path)
    path.write_text(json.dumps(dict(lines[0], family=["max"])) + "\n")
    with pytest.raises(ValueError, match=f'{path}:1: "family" must be a string'):
        load_held_out(path)


def test_before_after_table_and_samples_show_every_model_side_by_side():
    before = {"val_loss": 6.9, "val_ppl": 992.3, "bleu": 0.0, "exact_match": {"max": 0.0, "overall": 0.0}}
    after = {"val_loss": 0.02, "val_ppl": 1.02, "bleu": 97.5, "exact_match": {"max": 0.95, "overall": 0.95}}
    text = table({"step 0": before, "trained": after})
    assert text.splitlines()[0].split() == ["step", "0", "trained"]
    assert "val loss                    6.9000      0.0200" in text and "exact match max" in text and "95.0%" in text
    chinese = table({"step 0": {**before, "exact_match": {"数学": 0.0}}, "训练后": after})  # two columns a character
    assert len({shown_width(line) for line in chinese.splitlines()}) == 1  # still a rectangle on a terminal
    recs = [{"family": f, "messages": [], "answer": a} for f, a in (("a", "1"), ("b", "2"), ("a", "3"))]
    samples = pick_samples(recs, {"step 0": ["x", "y", "z"], "trained": ["1", "2", "3"]})
    assert samples == [{"family": "a", "messages": [], "answer": "1", "step 0": "x", "trained": "1"},
                       {"family": "b", "messages": [], "answer": "2", "step 0": "y", "trained": "2"}]


def test_prompts_without_families_get_one_exact_match_row():
    text = table({"model": {"bleu": 10.0, "exact_match": {"all": 0.5, "overall": 0.5}}})
    assert "exact match overall" in text and "exact match all" not in text


@pytest.mark.slow
def test_command_line_on_a_saved_run_gives_the_numbers_training_reported(tiny_run, tmp_path):
    data_dir, out = tiny_run
    r = subprocess.run([sys.executable, "-m", "nanosft.evaluate", "--ckpt", str(out), "--data",
                        str(data_dir / "eval.jsonl"), "--json", str(tmp_path / "m.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads((tmp_path / "m.json").read_text())
    trained = json.loads((out / "metrics.json").read_text())["after"]
    assert got["exact_match"] == trained["exact_match"] and got["bleu"] == pytest.approx(trained["bleu"])
    assert "exact match overall" in r.stdout and "expected>" in r.stdout
    assert math.isfinite(got["answer_loss"]) and got["answer_ppl"] == pytest.approx(math.exp(got["answer_loss"]))
    # the loss of the reference answers, named apart from train.py's validation loss (another set)
    assert "answer loss" in r.stdout and "val loss" not in r.stdout and "val_loss" not in got
