"""chat.py promises: --batch answers every input line, in order, exactly as evaluation does; bad
input of any kind (no trained run, a message longer than the context, impossible sampling flags,
a malformed prompt file) gets a message, never a traceback; interactive chat keeps the history."""

import json

import pytest
from conftest import run_chat

from nanosft.checkpoint import load_model
from nanosft.data import load_jsonl
from nanosft.evaluate import check_eval_record, exact_match
from nanosft.template import ChatTemplate

pytestmark = pytest.mark.slow


def test_batch_answers_every_line_in_order_and_matches_evaluation(tiny_run):
    data_dir, out = tiny_run
    recs = load_jsonl(data_dir / "eval.jsonl", check_eval_record)[:8]
    inp = data_dir / "prompts.jsonl"
    inp.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in recs))
    r = run_chat("--ckpt", str(out), "--batch", str(inp), "--max-new-tokens", "32")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    model, tok = load_model(out)
    _, replies = exact_match(model, ChatTemplate(tok), recs, max_new_tokens=32)
    assert lines == [{"reply": reply} for reply in replies]


def test_without_a_trained_run_it_says_how_to_train_one(tmp_path):
    r = run_chat("--ckpt", str(tmp_path / "nothing"), "--prompt", "hi")
    assert r.returncode != 0
    assert "make train" in r.stderr and "Traceback" not in r.stderr


def test_a_message_longer_than_the_context_is_an_error_not_a_traceback(tiny_run):
    _, out = tiny_run
    r = run_chat("--ckpt", str(out), "--prompt", "word " * 500)
    assert r.returncode != 0 and "leaves no room in the context" in r.stderr and "Traceback" not in r.stderr
    r = run_chat("--ckpt", str(out), input="word " * 500 + "\nhello\n")  # interactive: goes on after it
    assert r.returncode == 0 and "message too long" in r.stdout and "Traceback" not in r.stderr


@pytest.mark.parametrize("flags", [["--top-k", "0"], ["--top-p", "0"], ["--top-p", "1.5"], ["--max-new-tokens", "0"]])
def test_impossible_sampling_flags_are_refused(tiny_run, flags):
    r = run_chat("--ckpt", str(tiny_run[1]), "--prompt", "hi", *flags)
    assert r.returncode == 2 and flags[0] in r.stderr and "Traceback" not in r.stderr


def test_malformed_prompt_file_names_file_line_and_reason(tiny_run, tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n'
                   '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    r = run_chat("--ckpt", str(tiny_run[1]), "--batch", str(bad))
    assert r.returncode != 0 and f"{bad}:2: the last message must be a user turn" in r.stderr


def test_interactive_session_reads_a_pipe_and_resets(tiny_run):
    r = run_chat("--ckpt", str(tiny_run[1]), "--max-new-tokens", "8", input="My name is Ada.\n/reset\n你好 🙂\n/quit\nnever read\n")
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert r.stdout.count("> ") == 4  # three inputs answered or handled, then /quit ends it
