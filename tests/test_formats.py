"""formats.py and data.py promise: the same conversation written as chat messages, ShareGPT,
Alpaca (JSONL or a JSON array) or DeepSpeed-Chat trains on exactly the same tokens, with the
loss on the assistant turns' contents and their <|end|> only (or the last one only with
last-assistant); a conversation too long for a row loses its oldest whole exchanges, never part of
a turn; and every bad record is reported with file, line and reason, by `python -m nanosft.data
check` and by train.py alike, or, with --skip-invalid, counted exactly while the good ones train."""

import json
import re

import pytest
from conftest import TINY, run_train

from nanosft.cli import data_main
from nanosft.data import load_conversations, render_conversations, render_within
from nanosft.template import ChatTemplate
from nanosft.tokenizer import Tokenizer

SYSTEM = "You answer in one word."
TURNS = [("What colour is the sky?", "Blue."), ("And grass?", "Green."), ("你好吗？", "很好。")]
MESSAGES = [{"role": "system", "content": SYSTEM}] + [
    {"role": role, "content": text} for q, a in TURNS for role, text in (("user", q), ("assistant", a))]


def dschat_prompt():
    history = "".join(f" Human: {q} Assistant: {a}" for q, a in TURNS[:-1])
    return {"prompt": f"{history} Human: {TURNS[-1][0]} Assistant:", "chosen": f" {TURNS[-1][1]}"}


FIXTURES = {  # file name -> content; each holds the same conversation
    "messages.jsonl": json.dumps({"messages": MESSAGES}, ensure_ascii=False) + "\n",
    "sharegpt.jsonl": json.dumps({"conversations": [{"from": "system", "value": SYSTEM}] + [
        {"from": who, "value": text} for q, a in TURNS for who, text in (("human", q), ("gpt", a))]},
        ensure_ascii=False) + "\n",
    "dschat.jsonl": json.dumps(dschat_prompt(), ensure_ascii=False) + "\n",
}
ALPACA = [{"instruction": "Name the colour of the sky.", "input": "", "output": "Blue."},
          {"instruction": "Translate to Chinese.", "input": "good", "output": "很好。"}]


@pytest.fixture(scope="module")
def template():
    texts = [m["content"] for m in MESSAGES] + ["Name the colour Translate to Chinese good"] * 3
    return ChatTemplate(Tokenizer.train(texts, 300))


def write(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return p


def supervised_spans(ids, mask):
    """The runs of consecutive supervised tokens."""
    spans, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    return spans + ([cur] if cur else [])


@pytest.mark.parametrize("name", list(FIXTURES))
def test_every_chat_format_becomes_the_same_conversation(tmp_path, name, template):
    records, errors = load_conversations(write(tmp_path, name, FIXTURES[name]))
    assert errors == [] and len(records) == 1
    msgs = records[0]["messages"]
    want = MESSAGES[1:] if name == "dschat.jsonl" else MESSAGES  # DeepSpeed-Chat has no system prompt
    assert msgs == want and records[0]["format"] == name.split(".")[0]
    ids, mask = template.render(msgs)
    # the loss covers exactly each assistant content followed by <|end|>: nothing of system or user
    assert supervised_spans(ids, mask) == [template.tok.encode(a) + [template.end] for _, a in TURNS]
    ids, mask = template.render(msgs, train_on="last-assistant")
    assert supervised_spans(ids, mask) == [template.tok.encode(TURNS[-1][1]) + [template.end]]


def test_records_of_a_json_array_keep_their_line_and_nothing_after_it_is_lost(tmp_path):
    p = write(tmp_path, "alpaca.json", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"},\n'
                                        '  {"instruction": "d", "output": "e"}\n]\n{"instruction": "f", "output": "g"}\n')
    records, errors = load_conversations(p, skip_invalid=True)
    assert len(records) == 2 and errors == [f"{p}:3: unknown format (keys: instruction); expected messages, "
                                            "conversations, instruction/output or prompt/chosen",
                                            f"{p}:6: text after the array's closing ']'"]


def test_an_array_unreadable_past_an_error_is_refused_even_when_skipping_invalid_records(tmp_path):
    # 20 records, a syntax error in the 11th (line 12): skipping it would silently lose the 9 after it too
    recs = [json.dumps({"instruction": f"q{i}", "output": "a"}) for i in range(20)]
    recs[10] = recs[10].replace('"output"', '"output" oops')
    p = write(tmp_path, "alpaca.json", "[\n" + ",\n".join(recs) + "\n]\n")
    with pytest.raises(ValueError, match=f"{p}:12: invalid JSON .*nothing after it can be read"):
        load_conversations(p, skip_invalid=True)
    stray = GOOD.replace("hello", "hel\rlo")  # a raw \r inside one record: that line only, not "old Mac" endings
    records, errors = load_conversations(write(tmp_path, "stray.jsonl", "\n".join([GOOD, stray, GOOD]) + "\n"),
                                         skip_invalid=True)
    assert len(records) == 2 and len(errors) == 1 and "invalid JSON (Invalid control character at column" in errors[0]
    a_good_json_line = json.dumps({"messages": [{"role": "user", "content": "😀"}, {"role": "assistant", "content": "ok"}]})
    assert len(load_conversations(write(tmp_path, "emoji.jsonl", a_good_json_line + "\n"))[0]) == 1  # \ud83d\ude00: whole


def test_deepspeed_chat_markers_inside_a_turn_are_not_turns(tmp_path):
    quoted = {"prompt": " Human: What does 'Assistant: ' mean? Assistant:", "chosen": " A label."}
    stray = {"prompt": " Human: the Human: says Assistant:", "chosen": " x"}
    p = write(tmp_path, "dschat.jsonl", json.dumps(quoted) + "\n" + json.dumps(stray) + "\n")
    records, errors = load_conversations(p, skip_invalid=True)
    assert records[0]["messages"] == [{"role": "user", "content": "What does 'Assistant: ' mean?"},
                                      {"role": "assistant", "content": "A label."}]
    assert errors == [f'{p}:2: "prompt" markers do not alternate Human:, Assistant:, ... (a marker inside a turn?)']


def test_a_forced_format_refuses_records_of_another(tmp_path):
    p = write(tmp_path, "mixed.jsonl", FIXTURES["sharegpt.jsonl"] + FIXTURES["messages.jsonl"])
    records, errors = load_conversations(p, fmt="messages", skip_invalid=True)
    assert len(records) == 1 and errors == [f"{p}:1: not a messages record (keys: conversations)"]


@pytest.mark.parametrize("layout", ["jsonl", "array"])
def test_alpaca_as_jsonl_or_as_one_json_array(tmp_path, layout, template):
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ALPACA) if layout == "jsonl" else \
        json.dumps(ALPACA, ensure_ascii=False, indent=2)
    records, _ = load_conversations(write(tmp_path, "alpaca.json", text))
    assert [r["messages"] for r in records] == [
        [{"role": "user", "content": "Name the colour of the sky."}, {"role": "assistant", "content": "Blue."}],
        [{"role": "user", "content": "Translate to Chinese.\n\ngood"}, {"role": "assistant", "content": "很好。"}]]


def test_a_long_conversation_loses_its_oldest_whole_exchanges(template):
    ids, _ = template.render(MESSAGES)
    system_and_last = [MESSAGES[0]] + MESSAGES[-2:]
    short, _ = template.render(system_and_last)
    samples, counts = render_conversations([{"messages": MESSAGES}], template, len(short))
    assert counts == {"truncated": 1, "dropped": 0}
    got_ids, got_mask = (a.tolist() for a in samples[0])
    assert (got_ids, got_mask) == tuple(template.render(system_and_last))  # system kept, last exchange whole
    assert got_ids[-1] == template.end and got_mask[-1] == 1
    assert render_within(template, MESSAGES, len(ids))[2] == 0  # fits: nothing dropped
    # too short for even the last exchange: left out and counted, never cut
    samples, counts = render_conversations([{"messages": MESSAGES}], template, len(short) - 1)
    assert samples == [] and counts == {"truncated": 0, "dropped": 1}


GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
BAD = {  # case -> (file content, line, reason)
    "invalid JSON": (GOOD + '\n{"messages": [\n' + GOOD + "\n", 2, "invalid JSON"),
    "not an object": ("[1, 2]\n", 1, "expected a JSON object, got list"),
    "unknown format": ('{"text": "hello"}\n', 1, "unknown format (keys: text)"),
    "missing role": ('{"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}\n', 1,
                     "messages[0] has role None"),
    "unknown role": ('{"conversations": [{"from": "robot", "value": "x"}]}\n', 1, "conversations[0] has from 'robot'"),
    "role not a string": ('{"conversations": [{"from": ["human"], "value": "x"}]}\n', 1,
                          "conversations[0] has from ['human']"),
    "non-string content": ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}\n',
                           1, "messages[0] content is not a string"),
    "empty assistant turn": ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}\n',
                             1, "messages[1] is an empty assistant turn"),
    "not ending with assistant": ('{"messages": [{"role": "user", "content": "hi"}]}\n', 1,
                                  "the conversation ends with a user turn"),
    "invalid UTF-8": (b'{"messages": "\xff"}\n', 1, "invalid UTF-8"),
    "BOM": (b"\xef\xbb\xbf" + GOOD.encode() + b"\n", 1, "the file starts with a UTF-8 byte-order mark"),
    "truncated last line": (GOOD + "\n" + GOOD[:30], 2, "truncated last line"),
    "unpaired surrogate": (GOOD.replace("hello", "\\ud83d cut emoji") + "\n", 1,
                           "a string holds an unpaired UTF-16 surrogate ('\\ud83d')"),
    "bare carriage returns": (GOOD + "\r" + GOOD + "\r", 1, "lines end with a bare carriage return"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_record_is_named_by_file_line_and_reason(tmp_path, capsys, case):
    content, line, reason = BAD[case]
    p = write(tmp_path, "bad.jsonl", content)
    assert data_main(["check", str(p)]) == 1
    out = capsys.readouterr().out
    assert f"{p}:{line}: {reason}" in out, out
    with pytest.raises(ValueError, match="bad line"):  # strict, as train.py reads it
        load_conversations(p)


def test_check_says_one_line_when_all_is_well(tmp_path, capsys):
    files = [str(write(tmp_path, name, text)) for name, text in FIXTURES.items()]
    assert data_main(["check", *files]) == 0
    assert capsys.readouterr().out == ("ok: 3 good conversation(s) in 3 file(s) "
                                       "(1 in dschat format, 1 in messages format, 1 in sharegpt format)\n")
    empty = write(tmp_path, "empty.jsonl", "\n")  # nothing to train on: train.py refuses it, and so does the check
    assert data_main(["check", str(empty)]) == 1 and f"{empty}: no conversations in the file" in capsys.readouterr().out


def all_bad_cases(tmp_path, n_good=40):
    """One file: n_good good conversations, then a line of each bad kind that fits on a line."""
    good = [json.dumps({"messages": [{"role": "user", "content": f"what is {i} + 1?"},
                                     {"role": "assistant", "content": str(i + 1)}]}).encode() + b"\n" for i in range(n_good)]
    bad = [BAD[c][0] for c in BAD if c not in ("BOM", "truncated last line", "invalid JSON", "bare carriage returns")]
    bad += ['{"messages": [\n']
    p = tmp_path / "mixed.jsonl"
    p.write_bytes(b"".join(good + [b if isinstance(b, bytes) else b.encode() for b in bad]))
    return p, n_good, len(bad)


def test_train_stops_on_bad_records_or_skips_and_counts_them(tmp_path):
    p, n_good, n_bad = all_bad_cases(tmp_path)
    r = run_train("--data", str(p), "--val-data", "", "--eval-data", "", "--out", str(tmp_path / "strict"), *TINY)
    assert r.returncode != 0 and f"{n_bad} bad line(s) in {p}" in r.stderr and "Traceback" not in r.stderr
    out = tmp_path / "skip"
    r = run_train("--data", str(p), "--val-data", "", "--eval-data", "", "--out", str(out), "--skip-invalid",
                  "--steps", "2", "--dtype", "fp32", *TINY)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"{n_bad} invalid record(s) left out" in r.stdout and f"data: {n_good} conversations" in r.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["invalid_records_skipped"] == n_bad


def test_tokenized_data_is_cached_by_content_and_a_change_invalidates_it(tmp_path):
    import argparse
    from nanosft.cache import DataFile, tokenizer_for
    args = argparse.Namespace(cache_dir=str(tmp_path / "cache"), format="auto", skip_invalid=False, resume=False, val_split=0, stage="sft",
                              train_on="all-assistant", vocab_size=300, tokenizer_trainer="nanosft", tokenizer="",
                              tokenizer_kind="sentencepiece")
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{i} plus {i}?"},
                                                     {"role": "assistant", "content": f"{2 * i}, 你好"}]}) + "\n"
                            for i in range(60)), encoding="utf-8")

    def prepare():
        data = DataFile(path, args)
        tok = tokenizer_for(args, [data], None)
        samples, counts = data.samples(tok, ChatTemplate(tok), 129)
        return data, tok, samples

    first, tok1, s1 = prepare()
    assert first._records is not None  # read, validated, tokenizer trained, tokenized
    again, tok2, s2 = prepare()
    assert again._records is None  # the second time the file was never parsed
    assert tok2.to_bytes() == tok1.to_bytes() and len(s2) == len(s1) == 60
    assert all((a == c).all() and (b == d).all() for (a, b), (c, d) in zip(s1, s2))

    with open(path, "a", encoding="utf-8") as f:  # a changed input: read and tokenized again
        f.write(json.dumps({"messages": [{"role": "user", "content": "new"}, {"role": "assistant", "content": "yes"}]}) + "\n")
    changed, _, s3 = prepare()
    assert changed._records is not None and len(s3) == 61
    args.vocab_size = 280  # another tokenizer: tokenized again
    other, tok4, s4 = prepare()
    assert other._records is not None and tok4.vocab_size == 280 != tok1.vocab_size
    assert len(list((tmp_path / "cache").iterdir())) == 6  # 3 tokenizers and 3 tokenized files, no temporaries
    for cached in (tmp_path / "cache").iterdir():  # damaged cache files are recomputed, never an error
        cached.write_bytes(cached.read_bytes()[:50])
    _, tok5, _ = prepare()
    assert tok5.to_bytes() == tok4.to_bytes()


def test_stats_describes_what_training_would_see(tmp_path, capsys, template):
    files = [str(write(tmp_path, name, text)) for name, text in FIXTURES.items()]
    files.append(str(write(tmp_path, "alpaca.json", json.dumps(ALPACA, ensure_ascii=False))))
    model = tmp_path / "tok.model"
    template.tok.save(model)
    short = len(template.render(MESSAGES[:1] + MESSAGES[-2:])[0])  # system + last exchange
    assert data_main(["stats", *files, "--tokenizer", str(model), "--max-seq-len", str(short - 1)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("5 conversations in 4 file(s): 2 in alpaca format, 1 in dschat format, 1 in messages format, "
                      "1 in sharegpt format")
    rendered = [template.render(r["messages"]) for f in files for r in load_conversations(f)[0]]
    share = sum(sum(m) for _, m in rendered) / sum(len(i) for i, _ in rendered)
    assert f"supervised: {share:.1%} of all tokens (all-assistant)" in out[1]
    histogram = [int(line.split()[1]) for line in out[2:] if line.startswith("  ")]
    assert sum(histogram) == 5
    assert any(line.startswith(f"--max-seq-len {short - 1}: 2 fit, 3 lose their oldest exchanges, 0 are left out")
               for line in out)
    assert "[<|end|>]" in out[-1] and "[" + template.tok.id_to_piece(template.tok.encode("Blue.")[0]) + "]" in out[-1]


def test_pretrain_text_is_supervised_everywhere_and_long_documents_continue(tmp_path, template):
    from nanosft.data import load_documents, render_documents
    book = write(tmp_path, "book.txt", "The sky is blue. " * 40 + "\n\n天空是蓝色的。\n")
    lines = write(tmp_path, "docs.jsonl", json.dumps({"text": "Grass is green."}) + "\n" + json.dumps({"text": 5}) + "\n")
    docs, errors = load_documents(str(book))
    assert errors == [] and docs[0]["text"].endswith("天空是蓝色的。\n")
    docs2, errors = load_documents(str(lines), skip_invalid=True)
    assert [d["text"] for d in docs2] == ["Grass is green."] and errors == [f'{lines}:2: expected {{"text": "..."}} '
                                                                            "(a document for --stage pretrain)"]
    ids, mask = template.render_text(docs[0]["text"])
    assert ids[0] == template.bos and ids[-1] == template.tok.eos_id and mask == [0] + [1] * (len(ids) - 1)
    samples = render_documents(docs, template, 50)
    assert len(samples) == -(-(len(ids) - 1) // 49) > 2 and all(len(s[0]) <= 50 for s in samples)
    # each piece starts with the last token of the one before: it is context there, and was a
    # target before, so every token after <s> is predicted exactly once
    assert all(a[0][-1] == b[0][0] for a, b in zip(samples, samples[1:]))
    assert [int(t) for t in samples[0][0]] + [int(t) for s in samples[1:] for t in s[0][1:]] == ids
    assert sum(len(s[0]) - 1 for s in samples) == len(ids) - 1


def test_pretrain_stage_trains_on_text_files(tmp_path):
    a = write(tmp_path, "a.txt", " ".join(f"number {i} comes after {i - 1}." for i in range(1, 400)))
    b = write(tmp_path, "b.md", "# 笔记\n\n" + "你好，世界。" * 50)
    out = tmp_path / "pre"
    r = run_train("--stage", "pretrain", "--data", str(a), str(b), "--val-split", "0.2", "--val-data", "",
                  "--eval-data", "", "--out", str(out), "--steps", "8", "--dtype", "fp32", *TINY)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "pieces of text per epoch blended" in r.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["val_loss"] < m["val_loss_before"]


@pytest.mark.parametrize("layout", ["jsonl", "array"])
def test_a_json_error_names_the_line_and_the_column_of_the_bad_character(tmp_path, layout):
    """Columns count characters (not bytes) from 1 on the file's own line, as an editor shows them,
    also after Chinese text and inside a JSON array."""
    bad = '{"messages": [{"role": "user", "content": "你好，世界"}, {"role": "assistant", "content": oops}]}'
    column = bad.index("oops") + 1
    if layout == "jsonl":
        p = write(tmp_path, "bad.jsonl", f"{GOOD}\n{bad}\n")
    else:
        p = write(tmp_path, "bad.json", f"[\n  {GOOD},\n  {bad}\n]\n")
        column += 2  # the two spaces of indentation
    with pytest.raises(ValueError) as e:
        load_conversations(p)
    assert f"{p}:{2 if layout == 'jsonl' else 3}: invalid JSON" in str(e.value)
    assert f"at column {column})" in str(e.value)


# ---- preference pairs (formats.to_pair, data.load_pairs): the data of reward models and DPO

USER_HI = [{"role": "user", "content": "hi"}]


def test_preference_pairs_of_every_format_become_a_prompt_and_two_replies():
    from nanosft.formats import to_pair
    multi = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    cases = [
        ({"prompt": " Human: a Assistant: b Human: c Assistant:", "chosen": " yes", "rejected": " no"}, "dschat_pair", multi),
        ({"prompt": USER_HI, "chosen": [{"role": "assistant", "content": "yes"}],
          "rejected": [{"role": "assistant", "content": "no"}]}, "trl", USER_HI),
        ({"chosen": multi + [{"role": "assistant", "content": "yes"}],  # TRL, the prompt implicit
          "rejected": multi + [{"role": "assistant", "content": "no"}]}, "trl", multi),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: yes",
          "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: no", "source": "hh"}, "hh", multi),
    ]
    for rec, fmt, prompt in cases:
        assert to_pair(rec) == ((prompt, "yes", "no"), fmt)


@pytest.mark.parametrize("rec, complaint", [
    ({"prompt": " Human: a Assistant:", "chosen": "same", "rejected": "same"}, "chosen and rejected are the same reply"),
    ({"prompt": " Human: a Assistant:", "chosen": "yes", "rejected": "  "}, "the rejected reply is empty"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: yes", "rejected": "\n\nHuman: b\n\nAssistant: no"},
     "chosen and rejected must share everything before their last reply"),
    ({"chosen": "just text", "rejected": "other text"}, '"chosen" is not "Human: ... Assistant: ..." turns'),
    ({"prompt": USER_HI, "chosen": [{"role": "assistant", "content": "x"}], "rejected": "no"},
     '"chosen" and "rejected" must both be lists'),
    ({"answer": "x", "better": "y"}, "not a preference pair (keys: answer, better)"),
])
def test_a_bad_preference_pair_is_refused_naming_why(rec, complaint):
    from nanosft.formats import FormatError, to_pair
    with pytest.raises(FormatError, match=re.escape(complaint)):
        to_pair(rec)


def test_a_pairs_file_names_each_bad_line_or_skips_and_counts_them(tmp_path):
    from nanosft.data import load_pairs
    good = {"prompt": " Human: 2+2? Assistant:", "chosen": " 4", "rejected": " 5"}
    lines = [good, {**good, "rejected": " 4"}, good, {"prompt": [{"role": "assistant", "content": "x"}],
             "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + "{broken\n", encoding="utf-8")
    with pytest.raises(ValueError) as e:
        load_pairs(path)
    assert f"{path}:2: chosen and rejected are the same reply" in str(e.value)
    assert f"{path}:4: " in str(e.value) and f"{path}:5: invalid JSON" in str(e.value)
    records, errors = load_pairs(path, skip_invalid=True)
    assert len(records) == 2 and len(errors) == 3
    assert records[0] == {"messages": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5",
                          "format": "dschat_pair"}


def test_data_check_reads_a_pairs_file_as_pairs(tmp_path, capsys):
    good = {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5"}
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "rejected": good["chosen"]}) + "\n", encoding="utf-8")
    assert data_main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:2: chosen and rejected are the same reply" in out
    assert "1 good preference pair(s) in 1 file(s) (1 in hh format), 1 bad record(s)" in out
