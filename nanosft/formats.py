"""
The chat-data formats users arrive with, turned into the one data.py trains on:

    messages  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   (OpenAI, TRL)
    sharegpt  {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}    (ShareGPT, Vicuna)
    alpaca    {"instruction": "...", "input": "...", "output": "..."}                      (Stanford Alpaca)
    dschat    {"prompt": " Human: ... Assistant:", "chosen": "..."}                        (DeepSpeed-Chat)

Each record is recognised by its keys (or forced with --format), so one file may even mix them.
A file is JSONL (one record per line) or, as Alpaca ships, one JSON array of records; either way
every record keeps the line it starts on, so an error can name it.

For --stage pretrain, a plain text file (.txt, .md) is one document, and JSONL records
{"text": "..."} are one document each (read_text).

Preference pairs (reward models, DPO: to_pair), each a prompt with a chosen and a rejected reply:

    dschat_pair  {"prompt": " Human: ... Assistant:", "chosen": "...", "rejected": "..."}      (DeepSpeed-Chat)
    trl          {"prompt": [messages], "chosen": [messages], "rejected": [messages]}, or the
                 whole conversations in "chosen" and "rejected" without "prompt"               (TRL)
    hh           {"chosen": "\n\nHuman: ...\n\nAssistant: ...", "rejected": "..."}           (Anthropic HH)
"""

import json
import re

FORMATS = ("messages", "sharegpt", "alpaca", "dschat")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


class FormatError(ValueError):
    """A record that cannot become a conversation; the message is the reason."""


def detect(rec):
    """The format of one record, by its keys; None when it matches none."""
    if "messages" in rec:
        return "messages"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if "prompt" in rec and "chosen" in rec:
        return "dschat"
    return None


def _text(rec, key, where=None, required=True):
    if key not in rec and required:
        raise FormatError(f"{where or key} is missing")
    v = rec.get(key, "")
    if not isinstance(v, str):
        raise FormatError(f"{where or key} is not a string")
    return v


def from_sharegpt(rec):
    turns = rec["conversations"]
    if not isinstance(turns, list) or not turns:
        raise FormatError('"conversations" must be a non-empty list of {"from", "value"} objects')
    msgs = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise FormatError(f"conversations[{i}] is not an object")
        role = SHAREGPT_ROLES.get(t.get("from")) if isinstance(t.get("from"), str) else None
        if role is None:
            raise FormatError(f"conversations[{i}] has from {t.get('from')!r}; expected one of "
                              + ", ".join(sorted(SHAREGPT_ROLES)))
        msgs.append({"role": role, "content": _text(t, "value", f"conversations[{i}] value")})
    return msgs


def from_alpaca(rec):
    """The instruction, then the input below it if there is one, is the user turn."""
    instruction, extra, output = _text(rec, "instruction"), _text(rec, "input", required=False), _text(rec, "output")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    msgs = [{"role": "system", "content": _text(rec, "system")}] if rec.get("system") else []
    if not output.strip():
        raise FormatError("output is empty: nothing to train on")
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


DSCHAT_MARKER = re.compile(r"(?:^|(?<=\s))(Human|Assistant):\s*")  # at the start or after whitespace


def from_dschat(rec):
    """DeepSpeed-Chat writes turns inline: " Human: q1 Assistant: a1 Human: q2 Assistant:" and the
    reply to the last one in "chosen". Its markers become turns; a prompt without any is one user turn.
    The markers must alternate, Human first: a "Human:" quoted inside a turn would otherwise split it."""
    prompt, chosen = _text(rec, "prompt"), _text(rec, "chosen")
    parts = DSCHAT_MARKER.split(prompt)  # [before, role, text, role, text, ...]
    if len(parts) == 1:
        return [{"role": "user", "content": prompt.strip()}, {"role": "assistant", "content": chosen.strip()}]
    if parts[0].strip():
        raise FormatError('"prompt" has text before its first "Human:" marker')
    roles = parts[1::2]
    if any(r != ("Human" if i % 2 == 0 else "Assistant") for i, r in enumerate(roles)):
        raise FormatError('"prompt" markers do not alternate Human:, Assistant:, ... (a marker inside a turn?)')
    msgs = [{"role": "user" if role == "Human" else "assistant", "content": text.strip()}
            for role, text in zip(roles, parts[2::2])]
    if msgs[-1]["role"] != "assistant" or msgs[-1]["content"]:
        raise FormatError('"prompt" must end with "Assistant:" (the reply is in "chosen")')
    msgs[-1]["content"] = chosen.strip()
    return msgs


def to_messages(rec, fmt="auto"):
    """One record of any format -> (list of {"role", "content"}, its format). Raises FormatError."""
    if not isinstance(rec, dict):
        raise FormatError(f"expected a JSON object, got {type(rec).__name__}")
    found = detect(rec) if fmt == "auto" else fmt
    if found is None:
        keys = ", ".join(sorted(rec)[:6]) or "none"
        raise FormatError(f"unknown format (keys: {keys}); expected messages, conversations, "
                          "instruction/output or prompt/chosen")
    if detect(rec) != found:
        raise FormatError(f"not a {found} record (keys: {', '.join(sorted(rec)[:6]) or 'none'})")
    if found == "messages":
        return rec["messages"], found
    return {"sharegpt": from_sharegpt, "alpaca": from_alpaca, "dschat": from_dschat}[found](rec), found


# ---- preference pairs (a prompt, a chosen and a rejected reply): the data of reward models and DPO

PAIR_FORMATS = ("dschat_pair", "trl", "hh")
HH_MARKER = re.compile(r"\n\n(Human|Assistant): ?")  # Anthropic HH: "\n\nHuman: q\n\nAssistant: a"


def detect_pair(rec):
    """The preference format of one record, by its keys and their types; None when none matches."""
    if "chosen" not in rec or "rejected" not in rec:
        return None
    if isinstance(rec.get("chosen"), list):
        return "trl"  # messages, with the prompt apart or as the shared start of both
    if "prompt" in rec:
        return "dschat_pair"
    return "hh"


def _hh_turns(text, key):
    parts = HH_MARKER.split("\n\n" + text.lstrip("\n"))  # (the first turn's "\n\n" may be missing)
    if parts[0].strip() or len(parts) < 3:
        raise FormatError(f'"{key}" is not "Human: ... Assistant: ..." turns (Anthropic HH)')
    return [{"role": "user" if r == "Human" else "assistant", "content": t.strip()}
            for r, t in zip(parts[1::2], parts[2::2])]


def _split_shared(chosen, rejected, what):
    """Two whole conversations that share everything but the last reply -> (prompt, chosen reply,
    rejected reply)."""
    if not chosen or not rejected or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise FormatError(f"{what}: each conversation must end with the assistant's reply")
    if chosen[:-1] != rejected[:-1]:
        raise FormatError(f"{what}: chosen and rejected must share everything before their last reply")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def to_pair(rec, fmt="auto"):
    """One preference record of any format -> ((prompt messages, chosen reply, rejected reply), its
    format). Raises FormatError naming what is wrong."""
    if not isinstance(rec, dict):
        raise FormatError(f"expected a JSON object, got {type(rec).__name__}")
    found = detect_pair(rec) if fmt == "auto" else fmt
    if found is None or detect_pair(rec) != found:
        keys = ", ".join(sorted(rec)[:6]) or "none"
        raise FormatError(f"not a preference pair (keys: {keys}); expected prompt/chosen/rejected or chosen/rejected")
    if found == "dschat_pair":
        prompt = from_dschat({"prompt": _text(rec, "prompt"), "chosen": ""})[:-1]
        pair = prompt, _text(rec, "chosen").strip(), _text(rec, "rejected").strip()
    elif found == "hh":
        pair = _split_shared(_hh_turns(_text(rec, "chosen"), "chosen"), _hh_turns(_text(rec, "rejected"), "rejected"),
                             "Anthropic HH pair")
    else:
        chosen, rejected = rec["chosen"], rec["rejected"]
        if not isinstance(rejected, list) or not all(isinstance(m, dict) for m in chosen + rejected):
            raise FormatError('"chosen" and "rejected" must both be lists of {"role", "content"} messages')
        if "prompt" in rec:
            if not isinstance(rec["prompt"], list):
                raise FormatError('"prompt" must be a list of messages, as "chosen" and "rejected" are')
            chosen, rejected = rec["prompt"] + chosen, rec["prompt"] + rejected
        pair = _split_shared(chosen, rejected, "TRL pair")
    prompt, good, bad = pair
    if not good.strip() or not bad.strip():
        raise FormatError(f"the {'chosen' if not good.strip() else 'rejected'} reply is empty")
    if good == bad:
        raise FormatError("chosen and rejected are the same reply: nothing to prefer")
    if not any(m.get("role") == "user" for m in prompt):
        raise FormatError("the prompt has no user turn")
    return pair, found


UNREADABLE = "nothing after it can be read"  # an error --skip-invalid cannot skip: records would be lost unseen


def read_records(path):
    """Yield (line, record or None, reason or None) for every record of a JSONL file or of a .json
    file holding one array. Blank lines are skipped; nothing else is: a line that cannot be read
    is yielded with its reason (invalid UTF-8, a byte-order mark, invalid JSON, a last line cut
    short)."""
    with open(path, "rb") as f:
        head = f.read(4096)
        bom = head.startswith(b"\xef\xbb\xbf")  # what line 1 holds is then refused, not guessed at
        f.seek(3 if bom else 0)
        array = str(path).endswith(".json") and head[3 if bom else 0:].lstrip()[:1] == b"["
        if bom:  # (for an array, this one error stands for the whole file)
            yield 1, None, ("the file starts with a UTF-8 byte-order mark (BOM); save it as UTF-8 without BOM"
                            + (f"; {UNREADABLE}" if array else ""))
        if array:
            if not bom:
                yield from _read_array(f.read())
            return
        for lineno, raw in enumerate(f, 1):
            if bom and lineno == 1:
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, None, f"invalid UTF-8 ({e.reason} at byte {e.start})"
                continue
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                if e.msg == "Extra data" and "\r" in line[:e.pos]:  # a record ended, and a \r ended its line
                    yield lineno, None, ("lines end with a bare carriage return (\\r, old Mac style), so the file "
                                         f"reads as one line; save it with \\n line endings; {UNREADABLE}")
                    return
                cut = not raw.endswith(b"\n")  # the file ends inside this line
                msg = e.msg.removesuffix(" at")  # (json says "Invalid control character at")
                yield lineno, None, (f"truncated last line (no newline at the end of the file, and {msg} at "
                                     f"column {e.colno}): the file was probably cut off" if cut
                                     else f"invalid JSON ({msg} at column {e.colno})")
                continue
            reason = unpaired_surrogate(rec) if "\\u" in line else None  # only a \u escape can make one
            yield lineno, None if reason else rec, reason


def unpaired_surrogate(rec):
    """The reason a JSON record holds a string that is not text, or None. JSON allows "\\ud83d" alone,
    half of a UTF-16 pair (an emoji cut in two, typically); it is no character and cannot be encoded."""
    try:
        json.dumps(rec, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        return f"a string holds an unpaired UTF-16 surrogate ({e.object[e.start]!r}), half of a character: not valid text"
    return None


def _read_array(data):
    """The records of a file holding one JSON array, each with the line it starts on."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        yield data.count(b"\n", 0, e.start) + 1, None, f"invalid UTF-8 ({e.reason} at byte {e.start}); {UNREADABLE}"
        return
    decoder, i = json.JSONDecoder(), text.index("[") + 1
    line, counted = 1, 0  # line number of position `counted`, kept up to date as i moves on

    def line_at(pos):
        nonlocal line, counted
        line, counted = line + text.count("\n", counted, pos), pos
        return line

    def skip_space(pos):
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    i = skip_space(i)
    first = True
    while True:
        if i >= len(text):
            yield line_at(i), None, f"truncated JSON array (no closing ']'): the file was probably cut off; {UNREADABLE}"
            return
        if text[i] == "]":
            if skip_space(i + 1) < len(text):
                yield line_at(skip_space(i + 1)), None, "text after the array's closing ']'"
            return
        if not first:
            if text[i] != ",":
                yield line_at(i), None, f"expected ',' or ']' between the array's records; {UNREADABLE}"
                return
            i = skip_space(i + 1)
        first = False
        start = line_at(i)
        try:
            rec, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            yield e.lineno, None, f"invalid JSON ({e.msg.removesuffix(' at')} at column {e.colno}); {UNREADABLE}"
            return
        reason = unpaired_surrogate(rec)
        yield start, None if reason else rec, reason
        i = skip_space(i)


TEXT_SUFFIXES = (".txt", ".md")


def read_text(path):
    """Documents for --stage pretrain -> yield (line, {"text": ...} or None, reason or None): a
    .txt/.md file is one document; a JSONL file holds {"text": "..."} records."""
    if not str(path).endswith(TEXT_SUFFIXES):
        for lineno, rec, reason in read_records(path):
            if reason is None and not (isinstance(rec, dict) and isinstance(rec.get("text"), str)):
                rec, reason = None, 'expected {"text": "..."} (a document for --stage pretrain)'
            elif reason is None and not rec["text"].strip():
                rec, reason = None, "empty document"
            yield lineno, rec, reason
        return
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):
        yield 1, None, "the file starts with a UTF-8 byte-order mark (BOM); save it as UTF-8 without BOM"
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        yield data.count(b"\n", 0, e.start) + 1, None, f"invalid UTF-8 ({e.reason} at byte {e.start})"
        return
    if text.strip():
        yield 1, {"text": text}, None
    else:
        yield 1, None, "empty document"

