"""chat.py promises: --batch answers every input line, in order, exactly as evaluation does (or
sampled with the flags, each line reproducible from --seed and its line number); bad
input of any kind (no trained run, a message longer than the context, impossible sampling flags,
a malformed prompt file) gets a message, never a traceback; interactive chat keeps the history."""

import argparse
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import DIST_VARS, ROOT, run, run_chat

from nanosft.checkpoint import load_model
from nanosft.data import load_jsonl
from nanosft.evaluate import check_eval_record, generation_metrics
from nanosft.generate import reply
from nanosft.template import ChatTemplate


def test_batch_answers_every_line_in_order_and_matches_evaluation(tiny_run):
    data_dir, out = tiny_run
    recs = load_jsonl(data_dir / "eval.jsonl", check_eval_record)[:8]
    inp = data_dir / "prompts.jsonl"
    inp.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in recs))
    r = run_chat("--ckpt", str(out), "--batch", str(inp), "--max-new-tokens", "32")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    model, tok = load_model(out)
    _, replies = generation_metrics(model, ChatTemplate(tok), recs, max_new_tokens=32)
    assert lines == [{"reply": reply} for reply in replies]


def test_batch_samples_with_the_flags_reproducibly_per_line(tiny_run):
    data_dir, out = tiny_run
    recs = load_jsonl(data_dir / "eval.jsonl", check_eval_record)[:6]
    inp = data_dir / "sampled.jsonl"
    inp.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in recs))
    flags = ["--ckpt", str(out), "--max-new-tokens", "16", "--temperature", "1.5", "--top-k", "50"]
    replies = {seed: [json.loads(line)["reply"] for line in run_chat(*flags, "--batch", str(inp), "--seed", seed).stdout.splitlines()]
               for seed in ("1", "2")}
    again = [json.loads(line)["reply"] for line in run_chat(*flags, "--batch", str(inp), "--seed", "1").stdout.splitlines()]
    assert again == replies["1"] and len(again) == 6 and replies["2"] != replies["1"]
    # line i drew from a generator seeded by --seed and i: generate()'s own sampling, called directly
    model, tok = load_model(out)
    template = ChatTemplate(tok)
    for i, r in enumerate(recs):
        g = torch.Generator().manual_seed(1 * 1_000_003 + i)
        want = reply(model, template, r["messages"], 16, temperature=1.5, top_k=50, generator=g)
        assert replies["1"][i] == want, i


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


def test_piped_bytes_that_are_not_utf8_are_named_and_the_chat_goes_on(tiny_run):
    # strict decoding, as a terminal with a UTF-8 locale has it (under the C locale Python is lenient)
    env = {**{k: v for k, v in os.environ.items() if k not in DIST_VARS}, "PYTHONIOENCODING": "utf-8:strict"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "chat.py"), "--ckpt", str(tiny_run[1]), "--max-new-tokens", "4"],
                       input="caf\xe9\nhello\n".encode("latin-1"), cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert r.returncode == 0 and b"Traceback" not in r.stderr
    assert b"(not valid UTF-8 text at character 4; line ignored)" in r.stdout and b"> hello" in r.stdout


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


# -----------------------------------------------------------------------------
# streaming, sampling and the terminal

def test_replies_stream_token_by_token_printing_only_whole_characters(tiny_run, monkeypatch):
    import chat
    model, tok = load_model(tiny_run[1])
    text = "héllo 你好 🙂 ok"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # the tiny vocabulary spells the CJK and emoji in byte tokens
    events = []

    def fake_generate(*args, **kw):
        for i, t in enumerate(ids):
            events.append(("token", i))
            yield t

    class Screen:
        def write(self, s):
            events.append(("write", s))

        def flush(self):
            events.append(("flush", None))

    monkeypatch.setattr(chat, "generate", fake_generate)
    monkeypatch.setattr(sys, "stdout", Screen())
    args = argparse.Namespace(max_new_tokens=64, temperature=0.0, top_k=None, top_p=None)
    assert chat.stream_reply(model, ChatTemplate(tok), [{"role": "user", "content": "hi"}], args, None) == text

    writes = [s for kind, s in events if kind == "write"]
    assert "".join(writes) == text + "\n" and not any("\ufffd" in s for s in writes)
    # before the next token is made, the screen shows (written and flushed) all the text so far,
    # except a character whose bytes have not all arrived: nothing of it is printed yet
    on_screen = ""
    for i in range(len(ids) - 1):
        between = events[events.index(("token", i)) + 1:events.index(("token", i + 1))]
        on_screen += "".join(s for kind, s in between if kind == "write")
        so_far = tok.decode(ids[:i + 1])
        if so_far.endswith("\ufffd"):  # a character still incomplete: what is shown stops before it
            assert so_far.startswith(on_screen) and "\ufffd" not in on_screen, i
        else:
            assert on_screen == so_far, i
        assert not between or between[-1] == ("flush", None), i
    assert sum(k == "flush" for k, _ in events) >= len(text) - 2


def greedy_by_recomputing(model, template, messages, max_new_tokens):
    """The reference decoder: run the whole sequence again for every token, no cache, take the argmax."""
    ids = template.render_prompt(messages)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            t = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if t in template.stop_ids:
                break
            out.append(t)
    return template.tok.decode(out)


def test_temperature_zero_is_greedy_and_a_seed_makes_sampling_reproducible(babbler):
    model, tok = load_model(babbler)
    want = greedy_by_recomputing(model, ChatTemplate(tok), [{"role": "user", "content": "hello there"}], 24)
    assert len(want) > 5
    r = run_chat("--ckpt", str(babbler), "--prompt", "hello there", "--max-new-tokens", "24", "--temperature", "0")
    assert r.returncode == 0 and r.stdout == want + "\n"

    sampled = [run_chat("--ckpt", str(babbler), "--prompt", "hello there", "--max-new-tokens", "24", "--temperature",
                        "1", "--top-p", "0.9", "--seed", seed).stdout for seed in ("5", "5", "6")]
    assert sampled[0] == sampled[1] != sampled[2] and sampled[0] != want + "\n"


def test_ckpt_accepts_an_exported_hugging_face_directory(tiny_run, tmp_path):
    data_dir, out = tiny_run
    hf = tmp_path / "hf"
    assert run([sys.executable, "-m", "nanosft.export", str(out), str(hf)]).returncode == 0
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n"
                               for r in load_jsonl(data_dir / "eval.jsonl", check_eval_record)[:5]))
    replies = [run_chat("--ckpt", str(d), "--batch", str(prompts)).stdout for d in (out, hf)]
    assert replies[0] == replies[1] and replies[0].count("\n") == 5


class Terminal:
    """chat.py in a pseudo-terminal, as a shell runs it for a user: keys typed, bytes read back with
    the time they arrived. Decoding is slowed to 20 tokens/s (tests/slow_chat.py) so that streaming
    can be seen. (tests/tmux_chat.sh drives a trained model the same way in tmux.)"""

    def __init__(self, *args):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: chat.py with the terminal as stdin, stdout and stderr
            try:
                # as a login shell would: Ctrl-C interrupts (a test run started in the background
                # inherits SIGINT ignored, and Python then never raises KeyboardInterrupt)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.execv(sys.executable, [sys.executable, os.path.join(ROOT, "tests", "slow_chat.py"), *args])
            finally:
                os._exit(127)  # never go on running pytest in the child
        self.screen, self.pos = b"", 0

    def type(self, keys):
        os.write(self.fd, keys.encode())

    def _read(self, t0, timeout):
        assert time.monotonic() - t0 < timeout, f"nothing more after {self.screen[self.pos:]!r}"
        if not select.select([self.fd], [], [], 0.5)[0]:
            return None
        try:
            return os.read(self.fd, 4096)
        except OSError:  # the other end has closed
            return b""

    def read_until(self, marker, timeout=60):
        """Read until `marker` follows what earlier calls consumed -> (the text up to and including
        it, [(seconds since the call, bytes), ...] for every read that arrived meanwhile)."""
        t0, chunks, marker = time.monotonic(), [], marker.encode()
        while (at := self.screen.find(marker, self.pos)) < 0:
            data = self._read(t0, timeout)
            assert data != b"", f"chat.py ended before {marker!r}: {self.screen[self.pos:]!r}"
            if data:
                chunks.append((time.monotonic() - t0, data))
                self.screen += data
        # positions count bytes: a marker such as "\ufffd" is longer in UTF-8 than in characters
        text, self.pos = self.screen[self.pos:at + len(marker)].decode(errors="replace"), at + len(marker)
        return text, chunks

    def ask(self, line):
        """Type a line and wait for the next prompt -> the reply, as printed."""
        self.type(line + "\r")
        self.read_until(line + "\r\n")  # the terminal echoes what was typed
        return self.read_until("\r\n> ")[0][:-len("\r\n> ")]

    def __enter__(self):
        return self

    def __exit__(self, *exc):  # however the test ends, no chat.py is left running
        self.kill()

    def kill(self):
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):  # already gone
            pass

    def close(self, timeout=30):
        """Wait for chat.py to end -> its exit code."""
        t0 = time.monotonic()
        while self._read(t0, timeout) != b"":
            pass
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)


def fresh_replies(ckpt, tmp_path, conversations):
    """chat.py --batch: each conversation answered on its own (greedy, as interactive chat is)."""
    path = tmp_path / "fresh.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    r = run_chat("--ckpt", str(ckpt), "--batch", str(path), "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr
    return [json.loads(line)["reply"] for line in r.stdout.splitlines()]


def test_a_terminal_session_streams_resets_changes_system_and_handles_ctrl_c_and_ctrl_d(babbler, tmp_path):
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    name_q, own_name_q, story = user("What is my name?"), user("What is your name?"), user("Tell me a long story.")
    fresh_name, with_kira, without_kira, whole_story = fresh_replies(babbler, tmp_path, [
        [name_q], [{"role": "system", "content": "Your name is Kira."}, own_name_q], [own_name_q], [story]])
    with Terminal("--ckpt", str(babbler), "--max-new-tokens", "12") as term:
        term.read_until("> ")

        # streaming: part of the reply is on the screen before the rest of it has been generated
        term.type("My name is Ada.\r")
        term.read_until("My name is Ada.\r\n")
        text, chunks = term.read_until("\r\n> ")
        greeting = text[:-len("\r\n> ")]
        later = sum(len(c) for _, c in chunks[1:])  # what arrived after the first read of this reply
        first = text.encode()[:len(text.encode()) - later].decode(errors="replace").rstrip("\ufffd")
        assert 0 < len(first) < len(greeting) and greeting.startswith(first), chunks

        # /reset: the next answer is what a fresh conversation gets; before it, the history changed it
        remembered = term.ask("What is my name?")
        assert remembered == fresh_replies(babbler, tmp_path, [[user("My name is Ada."), {"role": "assistant", "content": greeting}, name_q]])[0]
        assert term.ask("/reset") == "(conversation forgotten)"
        assert term.ask("What is my name?") == fresh_name != remembered

        # /system: the answer is what a conversation with that system message gets, not what it was before
        term.ask("What is my name?")  # something for /system to forget
        assert term.ask("/system Your name is Kira.") == "(new conversation, system message: Your name is Kira.)"
        assert term.ask("What is your name?") == with_kira != without_kira
        assert term.ask("/reset") == "(conversation forgotten)"  # the system message stays
        assert term.ask("What is your name?") == with_kira

        # Ctrl-C at the prompt clears the line
        # (after the echo: a Ctrl-C that lands while readline is still taking in the keys before it
        # waits for Python's next look at its signals, a race a typist's pace never meets)
        term.type("never sent")
        term.read_until("never sent")
        term.type("\x03")
        term.read_until("(Ctrl-D or /quit to leave)\r\n> ")
        # Ctrl-C during a reply stops it where it was (a prefix of the whole reply) and the session goes on
        assert term.ask("/system") == "(new conversation, no system message)"
        term.type("Tell me a long story.\r")
        term.read_until("Tell me a long story.\r\n")
        begun = term.read_until(whole_story[:1])[0]  # the reply has begun: Ctrl-C now lands inside it
        term.type("\x03")
        stopped = (begun + term.read_until("\r\n> ")[0]).replace("^C", "")[:-len("\r\n> ")]
        assert 0 < len(stopped) < len(whole_story) and whole_story.startswith(stopped.rstrip("\ufffd")), stopped

        term.type("\x04")  # Ctrl-D at the prompt ends the session cleanly
        assert term.close() == 0 and b"Traceback" not in term.screen
