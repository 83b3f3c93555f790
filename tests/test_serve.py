"""nanosft.serve promises: it speaks OpenAI's chat API as the official `openai` client expects it
(whole and streamed replies, usage, models), its greedy replies are chat.py's, replies decoded in one
batch with other conversations are the replies each would get alone (no cross-talk between slots),
a client that leaves mid-stream frees its slot, bad requests get 4xx errors in OpenAI's shape while
the server goes on serving, and the web page at / chats in a real browser."""

import contextlib
import http.client
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from conftest import ROOT, run, run_chat

from nanosft.checkpoint import load_model
from nanosft.data import load_jsonl
from nanosft.evaluate import check_eval_record
from nanosft.generate import generate
from nanosft.quantize import quantize_model
from nanosft.serve import Server
from nanosft.template import ChatTemplate


def start(ckpt, **kw):
    """A server on a free port of 127.0.0.1, in this process; -> (server, base url)."""
    model, tok = load_model(ckpt)
    server = Server(model, tok, port=0, quiet=True, model_id="tiny", **kw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def stop(server):
    server.shutdown()  # no more connections
    server.server_close()  # and the engine's thread ends


@contextlib.contextmanager
def slowed(ckpt, seconds, **kw):
    """A server whose every engine step takes `seconds` longer: replies that cannot end by luck
    before a test has looked at them. -> (server, url); stopped however the test ends."""
    server, url = start(ckpt, **kw)
    step = server.engine.step
    server.engine.step = lambda: (time.sleep(seconds), step())
    try:
        yield server, url
    finally:
        stop(server)


@pytest.fixture(scope="module")
def served(tiny_run):
    server, url = start(tiny_run[1], slots=4)
    yield server, url, openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    stop(server)


@pytest.fixture(scope="module")
def babble(babbler):
    """The untrained babbler (long replies of arbitrary tokens) served with 8 slots."""
    server, url = start(babbler, slots=8)
    yield server, url, openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    stop(server)


def prompts(tiny_run, n):
    return [r["messages"] for r in load_jsonl(tiny_run[0] / "eval.jsonl", check_eval_record)[:n]]


def alone(model, template, messages, max_tokens, **sampling):
    """The reference: generate.py's decoder on this conversation alone -> (text, tokens)."""
    ids = list(generate(model, template.render_prompt(messages), max_tokens, stop_ids=template.stop_ids,
                        vocab_size=template.tok.vocab_size, **sampling))
    return template.tok.decode(ids), len(ids)


def post(url, body, headers=None, raw=False):
    """POST /v1/chat/completions with http.client -> (status, parsed JSON body)."""
    host, port = url.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    data = body if raw else json.dumps(body).encode()
    c.request("POST", "/v1/chat/completions", data, {"Content-Type": "application/json", **(headers or {})})
    r = c.getresponse()
    out = r.status, json.loads(r.read())
    c.close()
    return out


def health(url):
    host, port = url.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    c.request("GET", "/health")
    return json.loads(c.getresponse().read())


# ---- the API, through the official client

def test_greedy_replies_are_chat_pys_whole_and_streamed(served, tiny_run, tmp_path):
    _, _, client = served
    conversations = prompts(tiny_run, 6)
    inp = tmp_path / "prompts.jsonl"
    inp.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    r = run_chat("--ckpt", str(tiny_run[1]), "--batch", str(inp), "--max-new-tokens", "32")
    assert r.returncode == 0, r.stderr
    want = [json.loads(line)["reply"] for line in r.stdout.splitlines()]
    template = ChatTemplate(load_model(tiny_run[1])[1])
    for messages, expected in zip(conversations, want):
        whole = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=32)
        assert whole.choices[0].message.content == expected
        assert whole.choices[0].message.role == "assistant" and whole.object == "chat.completion"
        assert whole.usage.prompt_tokens == len(template.render_prompt(messages))
        assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=32,
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish == [whole.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage  # usage comes last


def test_models_and_health(served):
    server, url, client = served
    assert [m.id for m in client.models.list()] == ["tiny"]
    h = health(url)
    assert h["status"] == "ok" and h["free_slots"] == 4


def test_length_stop_strings_and_seeds(babble, babbler):
    server, _, client = babble
    model, tok = load_model(babbler)
    template = ChatTemplate(tok)
    messages = [{"role": "user", "content": "hello there"}]
    full, n = alone(model, template, messages, 24)
    r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=24)
    assert r.choices[0].message.content == full and r.choices[0].finish_reason == "length" and n == 24
    # a stop string: the reply ends just before its first appearance, whole or streamed
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = full[:full.index(stop)]
    r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=24, stop=[stop, "zzzz"])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=24,
                                                 stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut
    # sampling with a seed: generate.py's draws with a generator of that seed
    want, _ = alone(model, template, messages, 24, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(5))
    got = [client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=1.0, top_p=0.9,
                                          seed=seed).choices[0].message.content for seed in (5, 5, 6)]
    assert got[0] == got[1] == want != got[2]


# ---- many clients at once

def test_32_clients_4_requests_each_get_their_own_greedy_replies(babble, babbler):
    """128 requests, 8 slots: they queue, join and leave the batch between steps; every reply must be
    the one its conversation gets alone, whole or streamed."""
    server, url, client = babble
    model, tok = load_model(babbler)
    template = ChatTemplate(tok)
    conversations = [[{"role": "user", "content": f"message {i} " + "ab" * (i % 7)}] for i in range(128)]
    limits = [4 + i % 13 for i in range(128)]
    want = [alone(model, template, m, n)[0] for m, n in zip(conversations, limits)]

    def ask(i):
        kw = dict(model="tiny", messages=conversations[i], temperature=0, max_tokens=limits[i])
        if i % 2:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw))
        return client.chat.completions.create(**kw).choices[0].message.content

    def one_client(c):
        return [ask(c * 4 + j) for j in range(4)]

    steps = server.engine.steps
    with ThreadPoolExecutor(32) as pool:
        got = [r for rs in pool.map(one_client, range(32)) for r in rs]
    assert got == want
    assert server.engine.steps - steps < sum(limits) / 2  # decoded together: far fewer steps than tokens
    assert health(url)["free_slots"] == 8


def test_clients_that_leave_mid_stream_free_their_slots(babbler):
    """8 streams of 100 tokens, a decode step slowed to 10 ms so that none can finish first, dropped
    after their first event: their slots are free long before the replies would have ended."""
    with slowed(babbler, 0.01, slots=8) as (server, url):
        body = json.dumps({"messages": [{"role": "user", "content": "go on"}], "stream": True, "max_tokens": 100,
                           "temperature": 0, "ignore_eos": True}).encode()
        socks = []
        for _ in range(8):  # every slot taken by a stream that will be dropped
            s = socket.create_connection(("127.0.0.1", server.server_address[1]))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            seen = b""
            while b'"content": "' not in seen.replace(b'"content": ""', b""):  # a piece of the reply arrived
                more = s.recv(4096)
                assert more, seen
                seen += more
            socks.append(s)
        for s in socks:
            s.close()
        deadline = time.time() + 20
        while (health(url)["steps"] == 0 or health(url)["free_slots"] != 8) and time.time() < deadline:
            time.sleep(0.05)  # (until they joined the batch, and left it)
        h = health(url)
        assert h["free_slots"] == 8 and h["active"] == 0 and h["waiting"] == 0
        assert 0 < h["steps"] < 60  # the replies began and left early: 100 tokens each would take 100 steps
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                           extra_body={"ignore_eos": True})
        assert r.choices[0].finish_reason == "length"  # still serving


def test_a_client_that_leaves_before_a_whole_reply_frees_its_slot(babbler):
    """stream: false, 100 tokens at 10 ms a step, the connection closed after half a second."""
    with slowed(babbler, 0.01, slots=2) as (server, url):
        body = json.dumps({"messages": [{"role": "user", "content": "go on"}], "max_tokens": 100,
                           "temperature": 0, "ignore_eos": True}).encode()
        s = socket.create_connection(("127.0.0.1", server.server_address[1]))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(0.5)
        s.close()
        deadline = time.time() + 20
        while health(url)["active"] and time.time() < deadline:
            time.sleep(0.05)
        h = health(url)
        assert h["active"] == 0 and h["free_slots"] == 2 and 0 < h["steps"] < 90


# ---- bad requests

OK = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
BAD = {
    "invalid JSON": (b'{"messages": [', 400),
    "invalid UTF-8": (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400),
    "not an object": (b'[1, 2]', 400),
    "no messages": ({"max_tokens": 4}, 400),
    "empty messages": ({"messages": []}, 400),
    "messages not a list": ({"messages": "hi"}, 400),
    "message not an object": ({"messages": ["hi"]}, 400),
    "unknown role": ({"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    "content not text": ({"messages": [{"role": "user", "content": 5}]}, 400),
    "image part": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400),
    "last turn not the user's": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, 400),
    "negative max_tokens": ({**OK, "max_tokens": -5}, 400),
    "zero max_tokens": ({**OK, "max_tokens": 0}, 400),
    "absurd max_tokens": ({**OK, "max_tokens": 10 ** 12}, 400),
    "max_tokens a string": ({**OK, "max_tokens": "10"}, 400),
    "temperature too high": ({**OK, "temperature": 7}, 400),
    "top_p zero": ({**OK, "top_p": 0}, 400),
    "top_k zero": ({**OK, "top_k": 0}, 400),
    "n > 1": ({**OK, "n": 3}, 400),
    "stop not strings": ({**OK, "stop": [1, 2]}, 400),
    "five stop strings": ({**OK, "stop": list("abcde")}, 400),
    "stream not a bool": ({**OK, "stream": "yes"}, 400),
    "stream_options without stream": ({**OK, "stream_options": {"include_usage": True}}, 400),
    "unknown model": ({**OK, "model": "gpt-9"}, 404),
    "prompt longer than the context": ({"messages": [{"role": "user", "content": "word " * 400}]}, 400),
    "NaN temperature": (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400),
    "deeply nested JSON": (b"[" * 100_000 + b"]" * 100_000, 400),
    "a stop string too long": ({**OK, "stop": "x" * 1000}, 400),
    "presence_penalty": ({**OK, "presence_penalty": 1.5}, 400),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_request_gets_an_openai_style_4xx_and_the_server_goes_on(served, case):
    server, url, _ = served
    body, status = BAD[case]
    got, err = post(url, body, raw=isinstance(body, bytes))
    assert got == status, err
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"]
    assert post(url, OK)[0] == 200


def test_a_body_over_the_limit_is_refused_unread(served):
    server, url, _ = served
    s = socket.create_connection(("127.0.0.1", server.server_address[1]))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 1000000000\r\n\r\n{")
    head, _, body = s.makefile("rb").read().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and json.loads(body)["error"]["code"] == "body_too_large"
    assert post(url, OK)[0] == 200


def test_a_body_that_is_not_json_by_its_content_type_is_refused(served):
    """(What a web page can send to another site without asking the user's browser first.)"""
    server, url, _ = served
    status, err = post(url, OK, headers={"Content-Type": "text/plain"})
    assert status == 415 and err["error"]["code"] == "unsupported_media_type"


def test_a_full_waiting_queue_answers_429(tiny_run):
    server, url = start(tiny_run[1], slots=1, max_waiting=0)
    try:
        status, err = post(url, OK)
        assert status == 429 and err["error"]["code"] == "too_many_requests"
    finally:
        stop(server)


def test_a_request_that_cannot_be_sampled_fails_alone(babbler):
    """A temperature so small that dividing by it overflows decodes greedily; whatever a row's
    sampling does, the conversations decoded beside it go on."""
    with slowed(babbler, 0.002, slots=4) as (server, url):
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0)
        messages = [{"role": "user", "content": "go on"}]
        with ThreadPoolExecutor(2) as pool:
            long = pool.submit(lambda: client.chat.completions.create(model="tiny", messages=messages, max_tokens=60,
                                                                      temperature=0))
            tiny = pool.submit(lambda: client.chat.completions.create(model="tiny", messages=messages, max_tokens=60,
                                                                      temperature=1e-38))
            assert tiny.result().choices[0].message.content == long.result().choices[0].message.content


def test_unknown_fields_are_ignored_and_unknown_paths_are_404(served):
    server, url, _ = served
    status, body = post(url, {**OK, "frequency_penalty": 0, "user": "me", "something_new": {"a": 1}})
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")
    host, port = url.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    c.request("GET", "/v1/nothing")
    r = c.getresponse()
    assert r.status == 404 and json.loads(r.read())["error"]["code"] == "not_found"
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    c.request("PUT", "/v1/chat/completions", json.dumps(OK))
    r = c.getresponse()
    assert r.status == 405 and json.loads(r.read())["error"]["code"] == "method_not_allowed"
    assert r.getheader("Allow") == "POST"
    assert post(url, OK)[0] == 200


def test_head_answers_like_get_without_a_body_and_a_model_can_be_retrieved(served):
    server, url, client = served
    host, port = url.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    c.request("HEAD", "/health")
    r = c.getresponse()
    assert r.status == 200 and int(r.getheader("Content-Length")) > 0 and r.read() == b""
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


def test_an_api_key_is_required_when_set(tiny_run):
    server, url = start(tiny_run[1], slots=2, api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        right = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert right.chat.completions.create(model="tiny", messages=OK["messages"], max_tokens=2).choices
        assert post(url, OK)[0] == 401
    finally:
        stop(server)


def test_the_command_serves_a_quantized_model_on_loopback(tiny_run):
    """python -m nanosft.serve as a user starts it, --quantize int8: it listens on 127.0.0.1 and its
    greedy replies are those of the quantized model decoding alone."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-m", "nanosft.serve", "--ckpt", str(tiny_run[1]), "--port", str(port),
                          "--quantize", "int8", "--quiet"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        banner = p.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in banner
        model, tok = load_model(tiny_run[1])
        quantize_model(model, "int8")
        template = ChatTemplate(tok)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
        for messages in prompts(tiny_run, 4):
            r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=32)
            assert r.choices[0].message.content == alone(model, template, messages, 32)[0]
    finally:
        p.terminate()
        p.wait()


def test_the_command_says_what_is_wrong_without_a_traceback(tmp_path):
    r = run([sys.executable, "-m", "nanosft.serve", "--ckpt", str(tmp_path / "nothing")])
    assert r.returncode != 0 and "No trained model" in r.stderr and "Traceback" not in r.stderr
    r = run([sys.executable, "-m", "nanosft.serve", "--slots", "0"])
    assert r.returncode != 0 and "--slots must be at least 1" in r.stderr


# ---- the web page, in a real browser

def chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "no Chromium: `make test` installs Debian's chromium package (apt-get install chromium)"
    return path


def test_the_page_chats_in_a_headless_browser(served, tiny_run, tmp_path):
    from playwright.sync_api import sync_playwright
    server, url, _ = served
    model, tok = load_model(tiny_run[1])
    template = ChatTemplate(tok)
    first = prompts(tiny_run, 2)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(url + "/")
        page.fill("#max_tokens", "32")
        for i, messages in enumerate(first):  # two turns: the second is sent with the first's history
            page.fill("#input", messages[-1]["content"])
            page.press("#input", "Enter")
            page.wait_for_function(f"document.querySelectorAll('.msg.assistant').length == {i + 1}"
                                   " && !document.getElementById('send').disabled", timeout=30_000)
        shown = [e.inner_text() for e in page.query_selector_all(".msg")]
        page.screenshot(path=str(tmp_path / "page.png"))
        browser.close()
    history = [first[0][-1], {"role": "assistant", "content": alone(model, template, [first[0][-1]], 32)[0]}]
    second = alone(model, template, history + [first[1][-1]], 32)[0]
    assert shown == [first[0][-1]["content"], history[1]["content"], first[1][-1]["content"], second]


def test_the_page_shows_a_reply_while_it_streams(babbler):
    """The babbler's 100-token reply, slowed to a token per 5 ms so that it cannot all arrive at once,
    comes in several chunks: the page shows each prefix as it comes."""
    from playwright.sync_api import sync_playwright
    model, tok = load_model(babbler)
    want = alone(model, ChatTemplate(tok), [{"role": "user", "content": "go on"}], 100)[0]
    with slowed(babbler, 0.005, slots=2) as (server, url), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(url + "/")
        page.fill("#max_tokens", "100")
        # every text the reply's bubble shows, recorded as the page changes it
        page.evaluate("""() => { window.seen = [];
            new MutationObserver(() => { const b = document.querySelector('.msg.assistant');
                if (b) window.seen.push(b.textContent); })
              .observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true}); }""")
        page.fill("#input", "go on")
        page.press("#input", "Enter")
        page.wait_for_function("document.querySelectorAll('.msg.assistant').length == 1"
                               " && !document.getElementById('send').disabled", timeout=30_000)
        seen = [t for t in page.evaluate("window.seen") if t]
        browser.close()
    assert seen[-1] == want
    assert len(set(seen)) >= 2 and all(want.startswith(t) for t in seen)  # prefixes first, then the whole reply
