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


def test_a_request_cancelled_while_it_waits_never_takes_a_slot(model, engines):
    engine = engines(model, slots=1, stop_ids=set())
    first, waiting = Request([1, 2, 3], 40), Request([4, 5], 5)
    engine.submit(first)
    engine.submit(waiting)
    waiting.cancel()
    assert drain(waiting) == ([], ("done", "cancelled"))
    assert len(drain(first)[0]) == 40  # the one in the slot went on undisturbed


def test_prompts_join_within_the_prefill_budget_and_the_rest_next_step(model):
    engine = Engine(model, slots=4, stop_ids=set(), prefill_tokens=20)  # not started: steps by hand
    requests = [Request(list(range(1, 9)), 10) for _ in range(4)]  # 8 tokens each: two fit in 20
    for r in requests:
        engine.submit(r)
    engine.step()
    assert sorted(engine.active) == [0, 1] and len(engine.waiting) == 2
    engine.step()
    assert sorted(engine.active) == [0, 1, 2, 3]


def test_a_failing_prefill_ends_the_joining_requests_and_the_others_go_on(model, monkeypatch):
    engine = Engine(model, slots=2, stop_ids=set())
    running = Request([1, 2, 3], 5)
    engine.submit(running)
    engine.step()  # `running` is decoding
    monkeypatch.setattr(engine, "prefill", lambda requests: (_ for _ in ()).throw(RuntimeError("out of memory")))
    joining = Request([4, 5, 6], 5)
    engine.submit(joining)
    engine.step()
    assert drain(joining) == ([], ("error", "RuntimeError: out of memory"))
    assert 0 in engine.active and len(running.tokens) == 3  # (prefill, then a decode each step)


def test_stopping_the_engine_ends_every_request_with_an_error(model):
    engine = Engine(model, slots=1, stop_ids=set())  # never started: the requests stay where they are
    active, waiting = Request([1, 2], 30), Request([3, 4], 30)
    engine.submit(active)
    engine.submit(waiting)
    engine.step()
    engine.stop()
    assert drain(active)[1] == drain(waiting)[1] == ("error", "the server is stopping")
