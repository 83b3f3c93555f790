"""
The OpenAI chat-completions API, as serve.py speaks it: a request body checked field by field into
the settings of one completion, and the JSON of the replies (whole, or as streamed chunks).

    params = parse_chat_request(body, model_id, max_tokens_cap)     raises ApiError (-> HTTP 4xx)
    completion(...), chunk(...)                                     the response objects
    TextStream(tok, stop)                                           token ids -> text to send

Every field is checked here and nowhere else; a bad request gets an OpenAI-style error object,
{"error": {"message", "type", "param", "code"}}, naming the field and why. Fields this server does
not know are ignored, as OpenAI's own server ignores unknown ones; the ones it knows but cannot do
(n > 1, logprobs, tools, penalties, logit_bias, a JSON response_format) are refused rather than
silently dropped. Two fields beyond OpenAI's, as
vLLM has them: top_k, and ignore_eos (the reply runs to max_tokens: what benchmarks ask for).
"""

import json
import math
import time
import uuid

from nanosft.data import check_prompt

STOP_STRINGS = 4  # OpenAI's limit on `stop`
STOP_LENGTH = 256  # characters a stop string may have (TextStream compares its prefixes at every token)
GREEDY_BELOW = 1e-5  # a temperature this small samples like argmax, and dividing by it overflows: greedy


class ApiError(Exception):
    """-> an HTTP status and OpenAI's error object."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def read_json_body(body):
    """bytes -> the JSON object they hold, or ApiError saying what is wrong with them."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start})", code="invalid_utf8") from None
    try:
        value = json.loads(text, parse_constant=not_json)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                       code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body nests too deeply", code="invalid_json") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(value).__name__}", code="invalid_json")
    return value


def not_json(name):
    """NaN and Infinity, which Python's json reads but JSON has not."""
    raise ApiError(400, f"the request body is not valid JSON: {name} is not a JSON number", code="invalid_json")


def text_of(content, i):
    """A message's content: a string, or OpenAI's list of parts of which only text ones are read."""
    if not isinstance(content, list):
        return content  # (check_prompt says what is wrong with anything but a string)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"messages[{i}].content[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                           "are supported", param=f"messages[{i}].content")
        texts.append(part["text"])
    return "".join(texts)


def messages_of(req):
    """The conversation, as data.py's check_prompt accepts it: OpenAI's "developer" role is the system
    message, content parts are joined into text."""
    msgs = req.get("messages")
    if isinstance(msgs, list):
        msgs = [{"role": "system" if m.get("role") == "developer" else m.get("role"),
                 "content": text_of(m.get("content"), i)} if isinstance(m, dict) else m for i, m in enumerate(msgs)]
    reason = check_prompt({"messages": msgs})
    if reason:
        raise ApiError(400, reason, param="messages")
    return msgs


def number(req, name, default, low, high, integer=False, low_open=False):
    """req[name] (absent or null: default) checked to be a number in [low, high] ((low, high] with low_open)."""
    value = req.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise ApiError(400, f"{name} must be {'an integer' if integer else 'a number'}, not {json.dumps(value)[:40]}",
                       param=name)
    if value < low or value > high or (low_open and value == low):
        raise ApiError(400, f"{name} {value} is out of range: it must be {'>' if low_open else '>='} {low} and <= {high}",
                       param=name)
    return value


def flag(req, name):
    value = req.get(name)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false", param=name)
    return bool(value)


def stop_strings(req):
    stop = req.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > STOP_STRINGS
            or not all(isinstance(s, str) and 0 < len(s) <= STOP_LENGTH for s in stop)):
        raise ApiError(400, f"stop must be a string of 1 to {STOP_LENGTH} characters or a list of at most "
                       f"{STOP_STRINGS} of them", param="stop")
    return stop


def parse_chat_request(body, model_id, max_tokens_cap):
    """The body of POST /v1/chat/completions -> dict(messages, max_tokens, temperature, top_p, top_k,
    seed, stop, stream, include_usage, ignore_eos). max_tokens_cap: the most a request may ask for."""
    req = read_json_body(body)
    model = req.get("model")
    if model is not None and model != model_id:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {model_id!r}",
                       param="model", code="model_not_found")
    if number(req, "n", 1, 1, 1_000_000, integer=True) != 1:
        raise ApiError(400, "n > 1 is not supported: ask once per reply (seed gives each its own sample)", param="n")
    for name, harmless in (("logprobs", False), ("tools", []), ("functions", []), ("logit_bias", {}),
                           ("frequency_penalty", 0), ("presence_penalty", 0), ("response_format", {"type": "text"})):
        if req.get(name) not in (None, harmless):
            raise ApiError(400, f"{name} is not supported by this server", param=name)
    if req.get("max_tokens") is not None and req.get("max_completion_tokens") is not None:
        raise ApiError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
    name = "max_completion_tokens" if req.get("max_completion_tokens") is not None else "max_tokens"
    stream = flag(req, "stream")
    options = req.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise ApiError(400, "stream_options is an object, and only allowed with stream: true", param="stream_options")
    return dict(messages=messages_of(req),
                max_tokens=number(req, name, max_tokens_cap, 1, max_tokens_cap, integer=True),
                temperature=greedy_below(number(req, "temperature", 1.0, 0, 2)),
                top_p=number(req, "top_p", 1.0, 0, 1, low_open=True),
                top_k=number(req, "top_k", None, 1, 1 << 31, integer=True),
                seed=number(req, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True),
                stop=stop_strings(req), stream=stream, ignore_eos=flag(req, "ignore_eos"),
                include_usage=flag(options or {}, "include_usage"))


def greedy_below(temperature):
    return 0.0 if temperature < GREEDY_BELOW else temperature


class TextStream:
    """Token ids in, text out, as soon as it is safe to send: a character split over several byte
    tokens waits for its last byte, and text that may be the start of a stop string waits until it
    is clear that it is not. `done` once a stop string appeared (the text sent ends before it).

    Decoding all ids at every token would cost O(n) per token; instead each new piece is the
    difference between decoding the ids from a recent boundary with and without the new ones (as
    vLLM and TGI do), which a tokenizer's context rules (a leading space dropped at the start)
    affect equally on both sides."""

    def __init__(self, tok, stop=()):
        self.tok, self.stop = tok, list(stop)
        self.ids, self.text, self.sent, self.done = [], "", 0, False
        self.start = self.read = 0  # ids[start:read] decode to text already in self.text

    def push(self, token):
        """-> the text that can be sent now ('' if none)."""
        self.ids.append(token)
        new = self.unread()
        if new.endswith("\ufffd"):  # an incomplete character: wait for its other bytes
            return ""
        self.read_on(new)
        hits = [i for i in (self.text.find(s, max(self.sent - len(s), 0)) for s in self.stop) if i >= 0]
        if hits:
            self.done = True
            return self.take(min(hits))
        return self.take(len(self.text) - self.held())

    def unread(self):
        """The text of the ids past self.read: decoded from the boundary self.start with them, less
        decoded without them."""
        before = self.tok.decode(self.ids[self.start:self.read])
        return self.tok.decode(self.ids[self.start:])[len(before):]

    def read_on(self, new):
        self.text += new
        self.start, self.read = self.read, len(self.ids)

    def held(self):
        """How many characters at the end of the text could begin a stop string (the longest such)."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):  # the longest first
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def flush(self):
        """The end of the reply: whatever was held back for a stop string that never came (an
        unfinished character at the very end is sent as U+FFFD, as decoding it gives)."""
        if self.done:
            return ""
        self.read_on(self.unread())
        return self.take(len(self.text))

    def take(self, end):
        piece = self.text[self.sent:end]
        self.sent += len(piece)
        return piece


def new_id():
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid, model_id, text, finish_reason, used):
    """The whole reply (stream: false)."""
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": used}


def chunk(cid, model_id, delta=None, finish_reason=None, used=None):
    """One server-sent event's object (stream: true): a piece of the reply, its end, or (with
    stream_options.include_usage) the usage, which comes last with no choices."""
    choices = [] if used else [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}]
    out = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_id,
           "choices": choices}
    if used:
        out["usage"] = used
    return out
