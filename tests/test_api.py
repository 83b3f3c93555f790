"""api.py promises: a chat-completions body becomes the settings of one completion or an ApiError
naming the field (4xx, OpenAI's error object); TextStream turns token ids into exactly the text
decoding them all at once gives, sends no piece of a character before its last byte, and never sends
a character of a stop string: the text it sends ends where the first stop string begins."""

import random

import pytest

from nanosft.api import ApiError, TextStream, parse_chat_request
from nanosft.tokenizer import Tokenizer

TEXTS = ["héllo wörld, 你好世界! 🙂 count: 1 2 3", "the cat sat on the mat", "我叫张伟。你好，张伟。", "a\nb\n\nc  d"]


@pytest.fixture(scope="module")
def tok():
    # few merges, byte fallback: Chinese and the emoji come out as byte tokens, a character in pieces
    return Tokenizer.train(TEXTS * 3, 300)


def parse(body, cap=100):
    import json
    return parse_chat_request(json.dumps(body).encode(), "m", cap)


def test_a_request_becomes_the_settings_of_one_completion():
    p = parse({"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                                          {"role": "user", "content": "hi"}],
               "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "seed": 3, "stop": "\n",
               "stream": True, "stream_options": {"include_usage": True}, "something_else": [1]})
    assert p["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert (p["max_tokens"], p["temperature"], p["top_p"], p["top_k"], p["seed"]) == (7, 0.5, 0.9, 40, 3)
    assert p["stop"] == ["\n"] and p["stream"] and p["include_usage"] and not p["ignore_eos"]
    defaults = parse({"messages": [{"role": "user", "content": "hi"}]})
    assert (defaults["max_tokens"], defaults["temperature"], defaults["top_p"], defaults["stop"]) == (100, 1.0, 1.0, [])
    assert parse({"messages": [{"role": "user", "content": "hi"}], "temperature": 1e-9})["temperature"] == 0.0


@pytest.mark.parametrize("body, field", [
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 101}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_k": 2.5}, "top_k"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": "1"}, "seed"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "max_completion_tokens": 5}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, "messages"),
])
def test_each_bad_field_is_named(body, field):
    with pytest.raises(ApiError) as e:
        parse(body)
    assert e.value.status == 400 and e.value.param == field and e.value.body()["error"]["param"] == field


def stream_all(tok, ids, stop=()):
    ts = TextStream(tok, stop)
    pieces = []
    for t in ids:
        pieces.append(ts.push(t))
        if ts.done:
            break
    return pieces + [ts.flush()], ts


def test_pieces_add_up_to_decoding_everything_and_never_split_a_character(tok):
    rng = random.Random(0)
    for text in TEXTS:
        ids = tok.encode(text)
        pieces, _ = stream_all(tok, ids)
        assert "".join(pieces) == tok.decode(ids) == text
        assert all("\ufffd" not in p for p in pieces)
    for _ in range(50):  # random ids: byte tokens in any order, incomplete characters included
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        assert "".join(stream_all(tok, ids)[0]) == tok.decode(ids)


def test_the_text_sent_ends_where_the_first_stop_string_begins(tok):
    rng = random.Random(1)
    for _ in range(200):
        text = rng.choice(TEXTS)
        ids = tok.encode(text)
        i = rng.randrange(len(text))
        stop = [text[i:i + rng.randrange(1, 4)], "zzz"]  # one that occurs, one that does not
        pieces, ts = stream_all(tok, ids, stop)
        first = min(text.find(s) for s in stop if s in text)
        assert ts.done and "".join(pieces) == text[:first]
        sent = ""
        for p in pieces:  # at no point was a character of the stop string sent
            sent += p
            assert len(sent) <= first
