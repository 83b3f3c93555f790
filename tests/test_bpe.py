"""bpe.py promises the ids of Hugging Face's `tokenizers` library for the byte-level BPE families
(GPT-2, Llama 3 with ignore_merges, Qwen2 with NFC and single digits, SmolLM2 with Digits and
ByteLevel), built here with `tokenizers` itself and the families' own pre-tokenizer settings, on
thousands of varied strings; decode(encode(x)) == x for every string; a control token spelled in
the text stays text; and a tokenizer.json it cannot read is refused naming the file and the part."""

import json
import random
import unicodedata

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from nanosft.bpe import BYTE_CHAR, LLAMA3_PATTERN, QWEN2_PATTERN, bytes_to_unicode, load_tokenizer_json

FAMILIES = ("gpt2", "llama3", "qwen2", "smollm2")
SPECIAL = "<|endoftext|>"

# pieces of text of every kind the acceptance names; strings are random runs of them
PIECES = ["hello", " world", "The", " quick", "don't", "I'M", "she'll", "ABC's", "x = f(y) + 1;", "    def f():",
          "\tif (a && b) {", "}", "0", "7", "42", " 1234", "12345678901234567890", "3.14159", "-2.5e-3", "1,000",
          " ", "  ", "     ", "\n", "\n\n", "\r\n", "\t", " \n ", "你好", "世界", "我叫张伟。", "こんにちは", "カタカナ",
          "안녕하세요", "😀", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "مرحبا بالعالم", "e\u0301", "Å", "A\u030a", "ß", "Ωmega",
          "\x00", "\x07", "\x1f", "\x7f", "supercalifragilisticexpialidocious" * 3, "https://example.com/a?b=c",
          "naïve café", "ﬁ", "…", "—", "\u00a0", "\u3000", "Ḁ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]


def corpus():
    """What the test tokenizers learn their merges from: the pieces, and prose around them."""
    rng = random.Random(1)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 20))) for _ in range(3000)]


def reference(kind, path):
    """A tokenizer of `kind` trained by the tokenizers library and saved as tokenizer.json."""
    tok = Tokenizer(models.BPE(ignore_merges=kind == "llama3"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if kind == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif kind == "llama3":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"), byte_level])
    elif kind == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_PATTERN), "isolated"), byte_level])
    else:  # SmolLM2
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=1500, special_tokens=[SPECIAL], show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return tok


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "tokenizer.json"
    return request.param, reference(request.param, path), load_tokenizer_json(path)


def test_gpt2_byte_map_is_the_published_one():
    m = bytes_to_unicode()
    assert len(set(m.values())) == 256 and m[ord(" ")] == "Ġ" and m[ord("\n")] == "Ċ" and m[ord("A")] == "A"
    assert m[0] == "Ā" and m[0xAD] == "Ń" and BYTE_CHAR == m


def test_ids_equal_the_tokenizers_library_and_decode_gives_the_text_back(pair):
    kind, ref, ours = pair
    rng = random.Random(2)
    strings = ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 12))) for _ in range(10_000)]
    strings += ["", " ", "a", "\n" * 5, " " * 33, "9" * 40, "x" * 500]
    expected = [e.ids for e in ref.encode_batch(strings, add_special_tokens=False)]
    assert [ours.encode(s) for s in strings] == expected
    for s in strings:
        assert ours.decode(ours.encode(s)) == (unicodedata.normalize("NFC", s) if kind == "qwen2" else s)


def test_a_control_token_spelled_in_text_stays_text(pair):
    _, ref, ours = pair
    ids = ours.encode("say " + SPECIAL)
    assert ref.token_to_id(SPECIAL) not in ids and ours.decode(ids) == "say " + SPECIAL
    assert ref.encode("say " + SPECIAL).ids[-1] == ref.token_to_id(SPECIAL)  # (the library would match it)
    assert ours.decode([ref.token_to_id(SPECIAL)]) == ""  # control tokens vanish in decoding


def with_model(**fields):
    """A change to a tokenizer.json's text: these fields of its "model" replaced."""
    return lambda text: json.dumps({**json.loads(text), "model": {**json.loads(text)["model"], **fields}})


def with_top(**fields):
    return lambda text: json.dumps({**json.loads(text), **fields})


@pytest.mark.parametrize("change, complaint", [
    (lambda text: text[: len(text) // 2], "not valid JSON (line"),
    (with_model(type="Unigram"), "model type 'Unigram' is not supported"),
    (with_model(type="WordPiece"), "model type 'WordPiece' is not supported"),
    (with_top(pre_tokenizer={"type": "Whitespace"}), "pre_tokenizer: pre-tokenizer 'Whitespace' is not supported"),
    (with_top(pre_tokenizer={"type": "Sequence", "pretokenizers": [{"type": "Punctuation"}]}),
     "pre_tokenizer.pretokenizers[0]: pre-tokenizer 'Punctuation' is not supported"),
    (with_top(normalizer={"type": "NFKC"}), "normalizer 'NFKC' is not supported"),
    (with_top(pre_tokenizer={"type": "Split", "pattern": {"Regex": "(unclosed"}, "behavior": "Isolated", "invert": False}),
     "pre_tokenizer: the Split pattern does not compile"),
    (with_top(post_processor={"type": "RobertaProcessing"}), "post-processor 'RobertaProcessing' is not supported"),
    (with_model(merges=[["Ġ", "zzzq"]]), "model.merges[0] 'Ġ' 'zzzq' names a token that is not in the vocabulary"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "model"}), "missing or malformed 'model'"),
])
def test_a_file_it_cannot_read_is_refused_naming_the_file_and_the_part(tmp_path, change, complaint):
    good = tmp_path / "good.json"
    reference("gpt2", good)
    bad = tmp_path / "tokenizer.json"
    bad.write_text(change(good.read_text(encoding="utf-8")), encoding="utf-8")
    with pytest.raises(ValueError) as e:
        load_tokenizer_json(bad)
    assert str(e.value).startswith(f"{bad}: ") and complaint in str(e.value)


def test_merges_written_as_strings_read_as_the_pairs_they_name(tmp_path):
    """Older tokenizer.json files (GPT-2's, Llama 3's) spell each merge "left right"."""
    ref = reference("gpt2", tmp_path / "pairs.json")
    spec = json.loads((tmp_path / "pairs.json").read_text(encoding="utf-8"))
    spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]
    (tmp_path / "strings.json").write_text(json.dumps(spec), encoding="utf-8")
    text = "".join(PIECES)
    assert load_tokenizer_json(tmp_path / "strings.json").encode(text) == ref.encode(text, add_special_tokens=False).ids


def test_a_saved_tokenizer_json_loads_in_the_tokenizers_library_and_encodes_the_same(pair, tmp_path):
    _, ref, ours = pair
    ours.save(tmp_path / "tokenizer.json")
    again = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "".join(PIECES)
    assert again.encode(text, add_special_tokens=False).ids == ref.encode(text, add_special_tokens=False).ids == ours.encode(text)


def test_added_tokens_are_matched_in_the_text_as_the_file_says_and_special_ones_never(tmp_path):
    """lstrip/rstrip absorb the whitespace beside the token, "normalized" ones match in the NFC text;
    a special token's spelling stays text (nanosft's guarantee; the library would match it)."""
    from tokenizers import AddedToken
    ref = reference("qwen2", tmp_path / "base.json")
    ref.add_tokens([AddedToken("<tool_call>", normalized=False), AddedToken("[L]", lstrip=True, normalized=False),
                    AddedToken("[R]", rstrip=True, normalized=False), AddedToken("caf\u00e9", normalized=True), AddedToken("nai\u0308f", normalized=True)])
    ref.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer_json(tmp_path / "tokenizer.json")
    rng = random.Random(3)
    pieces = PIECES + ["<tool_call>", "[L]", "[R]", "  ", "cafe\u0301", "café", "<tool_call", "[L", "L]", "naïf", "nai\u0308f"]
    for _ in range(2000):
        s = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 10)))
        assert ours.encode(s) == ref.encode(s, add_special_tokens=False).ids, s
    lstrip, rstrip = ref.token_to_id("[L]"), ref.token_to_id("[R]")
    assert ours.encode("x  [L]") == ours.encode("x") + [lstrip] and ours.encode("[R]  y") == [rstrip] + ours.encode("y")
    assert ours.decode(ours.encode("a <tool_call> b")) == "a <tool_call> b"
    assert ref.token_to_id(SPECIAL) not in ours.encode("a " + SPECIAL)


def test_the_bos_a_template_post_processor_adds_is_the_tokenizers_bos(tmp_path):
    from tokenizers import processors
    ref = reference("llama3", tmp_path / "tokenizer.json")
    ref.add_special_tokens(["<|begin_of_text|>"])
    bos = ref.token_to_id("<|begin_of_text|>")
    ref.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    ref.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer_json(tmp_path / "tokenizer.json")
    assert ours.bos_id == bos == ref.encode("hi").ids[0] and ours.eos_id == ref.token_to_id(SPECIAL)
    assert [bos] + ours.encode("hi there") == ref.encode("hi there").ids


def test_a_trained_byte_level_tokenizer_loads_in_the_tokenizers_library_and_encodes_the_same(tmp_path):
    from nanosft.bpe import ByteLevelBPE
    ours = ByteLevelBPE.train(corpus(), 800, ["<|user|>", "<|end|>"])
    assert ours.vocab_size == 800 and ours.decode([ours.bos_id, ours.eos_id, ours.pad_id]) == ""
    more = ours.with_control_tokens(["<|im_start|>", "<|end|>"])  # (one new)
    assert more.vocab_size == ours.vocab_size + 1 and more.base_size == ours.base_size
    more.save(tmp_path / "tokenizer.json")
    ref = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    rng = random.Random(4)
    strings = ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 12))) for _ in range(2000)]
    assert [more.encode(s) for s in strings] == [e.ids for e in ref.encode_batch(strings, add_special_tokens=False)]
    assert all(more.decode(more.encode(s)) == s for s in strings)
    assert ref.encode("hi").ids[0] == more.bos_id and ref.token_to_id("<|im_start|>") == more.token_id("<|im_start|>")
    assert len(ours.encode("".join(corpus()[:50]))) < len("".join(corpus()[:50]).encode()) / 2  # it compresses


def test_the_command_line_trains_encodes_decodes_and_inspects_tokenizer_json(tmp_path):
    import subprocess
    import sys

    def cli(*args, stdin=""):
        r = subprocess.run([sys.executable, "-m", "nanosft.tokenizer", *args], input=stdin.encode(),
                           capture_output=True, timeout=120)
        assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr.decode()
        return r.stdout.decode("utf-8")

    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "q " + s}, {"role": "assistant", "content": "a " + s[::-1]}]},
                                       ensure_ascii=False) + "\n" for s in corpus()[:300]), encoding="utf-8")
    cli("train", "--kind", "bytelevel", "--input", str(chat), "--vocab-size", "600", "--out", str(tmp_path / "tokenizer.json"))
    ref = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))  # the library reads what the command wrote
    lines = ["Hello world", "", "  two  spaces ", "你好，世界 🚀", "digits 12345", "<|user|> is plain text\t!"]
    out = cli("encode", "--model", str(tmp_path / "tokenizer.json"), stdin="\n".join(lines) + "\n").split("\n")[:-1]
    assert out == [" ".join(map(str, ref.encode(line, add_special_tokens=False).ids)) for line in lines[:-1]] + [out[-1]]
    assert ref.token_to_id("<|user|>") not in map(int, out[-1].split())  # a control token's spelling stays text
    back = cli("decode", "--model", str(tmp_path), stdin="\n".join(out) + "\n")  # (the directory works too)
    assert back.split("\n")[:-1] == lines
    shown = cli("inspect", "--model", str(tmp_path), "--chat", str(chat), "-n", "1", "--chat-format", "chatml")
    assert "[<|im_end|>]" in shown and "<|im_start|>" in shown and "[<|im_start|>]" not in shown


def test_a_special_token_tokenizer_config_names_must_be_in_the_tokenizer(tmp_path):
    from nanosft.tokenizer_dir import load_tokenizer
    reference("qwen2", tmp_path / "tokenizer.json")
    for value in ("<|im_end|>", ["<|endoftext|>"], 7):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": value}))
        with pytest.raises(ValueError) as e:
            load_tokenizer(str(tmp_path))
        assert str(e.value) == f"{tmp_path / 'tokenizer_config.json'}: eos_token {value!r} is not a token of the tokenizer"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": SPECIAL}}))
    assert load_tokenizer(str(tmp_path)).eos_id == Tokenizer.from_file(str(tmp_path / "tokenizer.json")).token_to_id(SPECIAL)
