"""engine.py promises: requests decoded together, joining and leaving between steps, each get the
tokens generate.py gives them alone (greedy, or sampled with their own seeded generator); more
requests than slots wait their turn; a cancelled request leaves at the next step and frees its
slot; a failing step ends its requests with an error instead of leaving their clients waiting."""

import pytest
import torch

from nanosft.engine import Engine, Request
from nanosft.generate import generate
from nanosft.model import ModelConfig, Transformer

END = 5  # the stop token of these tests


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, dim=32, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=48)).eval()


@pytest.fixture
def engines():
    """Engine(...) started, and stopped after the test (no engine thread outlives its test)."""
    started = []

    def start(*args, **kw):
        started.append(Engine(*args, **kw).start())
        return started[-1]
    yield start
    for engine in started:
        engine.stop()


def drain(request, timeout=30):
    """-> (tokens, the final event)"""
    tokens = []
    while True:
        kind, value = request.events.get(timeout=timeout)
        if kind != "token":
            return tokens, (kind, value)
        tokens.append(value)


def test_requests_decoded_together_each_get_what_they_get_alone(model, engines):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (3, 7, 1, 12, 5, 9, 30, 2, 40)]
    settings = [dict(), dict(temperature=1.0, seed=11), dict(temperature=0.7, top_k=8, seed=12),
                dict(temperature=1.2, top_p=0.8, seed=13)]
    engine = engines(model, slots=3, stop_ids={END})  # 9 requests, 3 slots: they queue
    requests = [Request(p, 20, **settings[i % 4]) for i, p in enumerate(prompts)]
    for r in requests:
        engine.submit(r)
    for i, (p, r) in enumerate(zip(prompts, requests)):
        s = dict(settings[i % 4])
        seed = s.pop("seed", None)
        want = list(generate(model, p, 20, stop_ids={END}, generator=torch.Generator().manual_seed(seed or 0), **s))
        tokens, (kind, reason) = drain(r)
        assert tokens == want, i
        assert kind == "done" and reason == ("stop" if len(want) < min(20, 48 - len(p)) else "length"), i
    assert engine.load() == (0, 0, 3)


def test_a_cancelled_request_frees_its_slot_and_the_next_one_runs(model, engines):
    engine = engines(model, slots=1, stop_ids=set())
    first, second = Request([1, 2, 3], 40), Request([4, 5, 6], 3)
    engine.submit(first)
    engine.submit(second)
    assert first.events.get(timeout=30)[0] == "token"
    first.cancel()
    assert drain(first)[1] == ("done", "cancelled")
    assert drain(second) == (list(generate(model, [4, 5, 6], 3)), ("done", "length"))
    assert engine.load() == (0, 0, 1)


def test_ignore_eos_runs_to_max_tokens(model, engines):
    prompt = [7, 8, 9]
    greedy = list(generate(model, prompt, 40))  # no stop token: what follows it too
    end = greedy[0]  # make the first token the "end" token: a normal request stops at once
    engine = engines(model, slots=2, stop_ids={end})
    normal, forced = Request(prompt, 10), Request(prompt, 10, ignore_eos=True)
    engine.submit(normal)
    engine.submit(forced)
    assert drain(normal) == ([], ("done", "stop"))
    assert drain(forced) == (greedy[:10], ("done", "length"))


def test_a_failing_step_ends_its_requests_with_an_error(model, engines, monkeypatch):
    engine = engines(model, slots=2)
    monkeypatch.setattr(engine, "pick", lambda *a: (_ for _ in ()).throw(RuntimeError("out of memory")))
    r = Request([1, 2], 5)
    engine.submit(r)
    assert drain(r) == ([], ("error", "RuntimeError: out of memory"))
    assert engine.load() == (0, 0, 2)


def test_a_prompt_that_leaves_no_room_is_refused(model):
    with pytest.raises(ValueError, match="no room"):
        Engine(model, slots=1).submit(Request(list(range(48)), 5))
