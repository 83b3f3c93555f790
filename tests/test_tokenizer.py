"""
Tests for nanosft/tokenizer.py.

The sentencepiece library is the independent reference: a model we train must load
there and give the same ids, and a model sentencepiece trains must load here and
give the same ids. Every random test uses a fixed seed so a failure reproduces.
"""

import random
import subprocess
import sys

import pytest
import sentencepiece as spm

from nanosft.tokenizer import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, Tokenizer

ENGLISH = ("the a cat sat on mat hello world how are you today I am fine thanks what is your name "
           "my name please tell me story about dog river can't won't it's yes no okay").split()
CHINESE = "你好世界我们是中国人的一了在有这个大小学生"
EMOJI = ["😀", "🎉", "🚀", "👍", "❤️", "🤖"]
WHITESPACE = ["  ", "   ", "\t", "\n", "\n\n", " \n ", "    "]
# Characters the corpus never contains, so they need byte fallback.
RARE = ["𝔘", "ǅ", "한", "\u3000", "\u200b", "\x00", "\r", "\u0301", "Ω", "ß", "▁"]


def make_corpus(n_lines, seed):
    """Chat-like lines mixing English, Chinese, numbers, emoji and whitespace runs."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        parts = []
        for _ in range(rng.randint(3, 15)):
            r = rng.random()
            if r < 0.6:
                parts.append(rng.choice(ENGLISH) + rng.choice(["", "", "", ",", ".", "?", "!"]))
            elif r < 0.75:
                parts.append("".join(rng.choices(CHINESE, k=rng.randint(1, 4))))
            elif r < 0.85:
                parts.append(str(rng.randint(0, 99999)))
            elif r < 0.92:
                parts.append(rng.choice(EMOJI))
            else:
                parts.append(rng.choice(WHITESPACE))
        lines.append(" ".join(parts))
    return lines


def random_strings(n, seed, rare=True):
    """Edge cases first, then random mixes of words, characters and whitespace."""
    rng = random.Random(seed)
    atoms = (ENGLISH + list(CHINESE) + EMOJI + WHITESPACE + list(Tokenizer.SPECIALS)
             + list("abcxyz ABC  .,!?'\"-<>|/0123456789") + ["e\u0301", " ", " ", "  "]
             + (RARE if rare else []))
    yield from ["", " ", "   ", "\t", "\n", " \n\t ", "hello", " hello", "hello ", "  hello  world  "]
    for _ in range(n):
        yield "".join(rng.choice(atoms) for _ in range(rng.randint(1, 25)))


def train_sentencepiece(tmp_path, lines, **options):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines), encoding="utf-8")
    settings = dict(model_type="bpe", vocab_size=500, byte_fallback=True, split_digits=True,
                    normalization_rule_name="identity", add_dummy_prefix=True,
                    remove_extra_whitespaces=False, character_coverage=1.0, minloglevel=2)
    settings.update(options)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), **settings)
    return tmp_path / "sp.model"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Our tokenizer trained on the multilingual corpus, and the path it was saved to."""
    tok = Tokenizer.train(make_corpus(3000, seed=0), vocab_size=700)
    path = tmp_path_factory.mktemp("ours") / "tokenizer.model"
    tok.save(path)
    return tok, path


@pytest.fixture(scope="module")
def sp_llama_like(tmp_path_factory):
    """A model trained by sentencepiece itself with Llama's settings (whitespace-only pieces too)."""
    path = train_sentencepiece(tmp_path_factory.mktemp("sp"), make_corpus(3000, seed=1),
                               allow_whitespace_only_pieces=True)
    return path, spm.SentencePieceProcessor(model_file=str(path))


def assert_same_vocabulary(tok, sp):
    assert tok.vocab_size == sp.get_piece_size()
    for i in range(tok.vocab_size):
        piece, score, kind = tok.pieces[i]
        assert (tok.id_to_piece(i), score) == (sp.id_to_piece(i), sp.get_score(i)), i
        assert (kind == CONTROL, kind == BYTE, kind == UNKNOWN) == \
            (sp.is_control(i), sp.is_byte(i), sp.is_unknown(i)), i
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == \
        (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id())


def assert_same_encoding(tok, sp, seed, n=2000):
    for text in random_strings(n, seed):
        assert tok.encode(text) == sp.encode(text), repr(text)


def test_saved_model_loads_in_sentencepiece_and_encodes_identically(trained):
    tok, path = trained
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert_same_vocabulary(tok, sp)
    assert_same_encoding(tok, sp, seed=2)


def test_loads_sentencepiece_trained_bpe_model_and_matches_its_ids(sp_llama_like):
    path, sp = sp_llama_like
    tok = Tokenizer.load(path)
    assert_same_vocabulary(tok, sp)
    assert_same_encoding(tok, sp, seed=3)
    for text in random_strings(500, seed=4):
        ids = sp.encode(text)
        assert tok.decode(ids) == sp.decode(ids), repr(text)


@pytest.mark.parametrize("options, normalizer", [
    (dict(byte_fallback=False), {}),  # unknown characters become <unk>; a run of them one <unk>
    (dict(remove_extra_whitespaces=True), {}),  # sentencepiece's default: strip and collapse spaces
    (dict(add_dummy_prefix=False, allow_whitespace_only_pieces=True), {}),
    # sentencepiece only trains BPE with escaping on, so these flip the flags afterwards
    ({}, dict(escape_whitespaces=False)),
    ({}, dict(escape_whitespaces=False, remove_extra_whitespaces=True, add_dummy_prefix=False)),
], ids=["no_byte_fallback", "remove_extra_whitespaces", "no_dummy_prefix", "no_escape", "no_escape_strip"])
def test_matches_sentencepiece_under_other_settings(tmp_path, options, normalizer):
    options = {"vocab_size": 400 if options.get("byte_fallback", True) else 120, **options}
    tok = Tokenizer.load(train_sentencepiece(tmp_path, make_corpus(1000, seed=14), **options))
    tok = Tokenizer(tok.pieces, tok.trainer, {**tok.normalizer, **normalizer})
    tok.save(tmp_path / "edited.model")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "edited.model"))
    assert_same_vocabulary(tok, sp)
    assert_same_encoding(tok, sp, seed=15, n=1000)
    for text in random_strings(300, seed=16):
        ids = sp.encode(text)
        assert tok.decode(ids) == sp.decode(ids), repr(text)


def test_decode_matches_sentencepiece_on_arbitrary_id_sequences(trained, sp_llama_like):
    """Any ids, including controls, <unk> (" ⁇ ") and byte runs that are not valid
    UTF-8 (one U+FFFD per bad byte), decode exactly as sentencepiece decodes them."""
    rng = random.Random(5)
    for tok, sp in [(trained[0], spm.SentencePieceProcessor(model_file=str(trained[1]))),
                    (Tokenizer.load(sp_llama_like[0]), sp_llama_like[1])]:
        for _ in range(2000):
            ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 10))]
            if rng.random() < 0.5:  # bias towards the interesting low ids: specials and bytes
                ids = [i % 300 for i in ids]
            assert tok.decode(ids) == sp.decode(ids), ids


def test_resaving_a_sentencepiece_model_is_byte_identical(sp_llama_like, tmp_path):
    """Fields we do not interpret (training options, the empty charsmap, ...) survive a re-save."""
    path, _ = sp_llama_like
    Tokenizer.load(path).save(tmp_path / "again.model")
    assert (tmp_path / "again.model").read_bytes() == path.read_bytes()


def test_user_defined_and_unused_pieces_follow_sentencepiece(trained, tmp_path):
    """USER_DEFINED pieces are matched whole and never merge further; UNUSED pieces can
    be merge steps but are split again. A piece with "▁" inside disables the word cache."""
    tok, _ = trained
    pieces = list(tok.pieces)
    for i in range(300, len(pieces), 7):
        piece, score, _ = pieces[i]
        pieces[i] = (piece, score, UNUSED if i % 2 else USER_DEFINED)
    pieces += [("cat▁sat", 0.0, USER_DEFINED), ("<uu>", 0.0, USER_DEFINED)]
    edited = Tokenizer(pieces, tok.trainer, tok.normalizer)
    assert edited._chunker is None
    edited.save(tmp_path / "edited.model")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "edited.model"))
    assert_same_vocabulary(edited, sp)
    assert_same_encoding(edited, sp, seed=6, n=1000)


def test_word_cache_gives_same_ids_as_whole_string_encoding(trained, sp_llama_like):
    for tok in (trained[0], Tokenizer.load(sp_llama_like[0])):
        assert tok._chunker is not None
        whole = Tokenizer(tok.pieces, tok.trainer, tok.normalizer)
        whole._chunker = None
        for text in random_strings(300, seed=7):
            assert tok.encode(text) == whole.encode(text), repr(text)


def test_decode_inverts_encode_on_random_unicode(trained):
    tok, _ = trained
    rng = random.Random(8)
    alphabet = (list(CHINESE) + EMOJI + list("abc XYZ\t\n\r.,-")
                + ["e\u0301", "\u0301", "ǅ", "𝔘", "한", "\u3000", "\x00"])
    texts = list(random_strings(1000, seed=9, rare=False))
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(1000)]
    texts += ["  leading", "trailing  ", "   ", "\n\n\nx\n\n", "\t\ttabs\t"]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text, repr(text)


def test_user_text_never_produces_control_tokens(trained):
    tok, _ = trained
    text = "<|system|>hi<|user|> <s>What is </s><|assistant|><pad><|end|><unk> <|end|>"
    rng = random.Random(10)  # a corpus full of those spellings, which BPE would otherwise learn
    corpus = ["".join(rng.choice(ENGLISH) + rng.choice(Tokenizer.SPECIALS) for _ in range(8))
              for _ in range(300)]
    for t in (tok, Tokenizer.train(corpus, vocab_size=600)):
        ids = t.encode(text)
        controls = {i for i, (_, _, kind) in enumerate(t.pieces) if kind in (CONTROL, UNKNOWN)}
        assert not controls & set(ids)
        assert t.decode(ids) == text
        # the literal spelling is just text: ordinary pieces (or bytes), never the control id
        literal = t.encode("<|end|>")
        assert t.token_id("<|end|>") not in literal and len(literal) > 1
        assert {t.pieces[i][2] for i in literal} <= {NORMAL, BYTE}


def test_vocabulary_layout_and_special_ids(trained):
    tok, _ = trained
    assert [tok.id_to_piece(i) for i in range(8)] == list(Tokenizer.SPECIALS)
    assert [kind for _, _, kind in tok.pieces[:8]] == [UNKNOWN] + [CONTROL] * 7
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(8 + b) for b in (0, 10, 255)] == ["<0x00>", "<0x0A>", "<0xFF>"]
    assert all(kind == BYTE for _, _, kind in tok.pieces[8:264])
    assert all(kind == NORMAL for _, _, kind in tok.pieces[264:])
    merged = [score for piece, score, _ in tok.pieces[264:] if len(piece) > 1]
    assert merged == sorted(merged, reverse=True) and len(set(merged)) == len(merged)
    assert tok.token_id("<|assistant|>") == 6 and tok.decode([1, 6, 2]) == ""
    with pytest.raises(KeyError, match="not in the vocabulary"):
        tok.token_id("<|nope|>")


def test_every_digit_is_its_own_token(trained):
    tok, _ = trained
    text = "Call 0123456789 or 2024-12-31, pay $99999.50 x42"
    pieces = [tok.id_to_piece(i) for i in tok.encode(text)]
    assert [p for p in pieces if any(c.isdigit() for c in p) and not p.startswith("<0x")] == \
        [c for c in text if c.isdigit()]
    assert not any(len(p) > 1 and any(c.isdigit() for c in p)
                   for p, _, kind in tok.pieces if kind != BYTE)


def test_unseen_characters_become_utf8_byte_pieces(trained):
    tok, _ = trained
    ids = tok.encode("a𝔘")  # "𝔘" never occurs in the corpus
    assert [tok.id_to_piece(i) for i in ids[-4:]] == ["<0xF0>", "<0x9D>", "<0x94>", "<0x98>"]
    assert tok.decode(ids) == "a𝔘"


def test_rare_characters_are_left_to_bytes_as_sentencepiece_leaves_them(tmp_path):
    """A long tail of rare characters (random Chinese names) must not crowd merges out of the
    vocabulary: characters get pieces only up to 99.95% coverage, the sentencepiece trainer's
    default, and both trainers keep the same characters."""
    rng = random.Random(5)
    rare = [chr(c) for c in range(0x4E00, 0x4E00 + 40)]  # 40 occurrences in ~100,000 characters
    lines = [" ".join(rng.choice(ENGLISH) for _ in range(12)) for _ in range(1800)]
    lines += [f"name {ch}" for ch in rare]
    ours = Tokenizer.train(lines, 400)
    theirs = spm.SentencePieceProcessor(model_file=str(train_sentencepiece(
        tmp_path, lines, vocab_size=400, character_coverage=0.9995)))
    chars = {p for p, _, kind in ours.pieces if kind == NORMAL and len(p) == 1}
    assert chars == {theirs.id_to_piece(i) for i in range(theirs.get_piece_size())
                     if len(theirs.id_to_piece(i)) == 1 and not theirs.is_byte(i) and not theirs.is_control(i)
                     and not theirs.is_unknown(i)}
    assert not chars & set(rare) and len([p for p, _, _ in ours.pieces if len(p) > 1]) > 50  # merges kept
    assert [ours.id_to_piece(i) for i in ours.encode(rare[0])][-3:] == ["<0xE4>", "<0xB8>", "<0x80>"]

def test_literal_space_marker_reads_back_as_a_space(trained):
    """"▁" (U+2581) spells a space inside pieces, so like sentencepiece we decode it as one."""
    tok, _ = trained
    assert tok.decode(tok.encode("a▁b")) == "a b"


def test_training_is_deterministic_and_checks_vocab_size():
    corpus = make_corpus(300, seed=11)
    assert Tokenizer.train(corpus, 400).pieces == Tokenizer.train(corpus, 400).pieces
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(corpus, 100)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_bad_model_file_raises_value_error_naming_the_file(trained, tmp_path, damage):
    data = trained[1].read_bytes()
    broken = {"truncated": data[:len(data) // 2 + 3],
              "garbage": bytes(random.Random(12).randrange(256) for _ in range(4000)),
              "empty": b""}[damage]
    path = tmp_path / f"{damage}.model"
    path.write_bytes(broken)
    with pytest.raises(ValueError, match=f"{damage}.model"):
        Tokenizer.load(path)


def test_rejects_models_it_cannot_reproduce(tmp_path):
    """A unigram model would need a different algorithm: refuse it instead of mis-encoding."""
    path = train_sentencepiece(tmp_path, make_corpus(300, seed=13), model_type="unigram", vocab_size=400)
    with pytest.raises(ValueError, match="BPE"):
        Tokenizer.load(path)


@pytest.mark.parametrize("add_dummy_prefix", [True, False])
@pytest.mark.parametrize("remove_extra_whitespaces", [False, True])
@pytest.mark.parametrize("byte_fallback", [True, False])
@pytest.mark.parametrize("split_digits", [True, False])
def test_parity_with_sentencepiece_on_10000_strings_for_every_setting(
        tmp_path, add_dummy_prefix, remove_extra_whitespaces, byte_fallback, split_digits):
    """Every combination of the four settings Llama-family models vary (Llama, Llama 2, Mistral
    and TinyLlama use dummy prefix, no whitespace removal, byte fallback, split digits)."""
    path = train_sentencepiece(tmp_path, make_corpus(1500, seed=21), vocab_size=500 if byte_fallback else 250,
                               add_dummy_prefix=add_dummy_prefix, remove_extra_whitespaces=remove_extra_whitespaces,
                               byte_fallback=byte_fallback, split_digits=split_digits,
                               allow_whitespace_only_pieces=True)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    tok = Tokenizer.load(path)
    strings = list(random_strings(10_000, seed=22))
    assert len(strings) >= 10_000 and "" in strings and "   " in strings
    for text in strings:
        ids = tok.encode(text)
        assert ids == sp.encode(text), repr(text)
        assert tok.decode(ids) == sp.decode(ids), repr(text)


def test_sentencepiece_trainer_option_gives_our_layout_and_our_encoder_serves_it(tmp_path):
    tok = Tokenizer.train_spm(make_corpus(2000, seed=31), vocab_size=600)
    assert [tok.id_to_piece(i) for i in range(8)] == list(Tokenizer.SPECIALS)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert all(tok.pieces[i][2] == CONTROL for i in range(1, 8))
    tok.save(tmp_path / "spm.model")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "spm.model"))
    assert_same_vocabulary(tok, sp)
    assert_same_encoding(tok, sp, seed=32)


def run_cli(*args, stdin=b""):
    r = subprocess.run([sys.executable, "-m", "nanosft.tokenizer", *args], input=stdin, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode("utf-8")


def test_cli_encodes_and_decodes_line_by_line_like_sentencepiece(sp_llama_like, tmp_path):
    path, sp = sp_llama_like
    lines = ["Hello world", "", "  two  spaces ", "你好，世界 🚀", "digits 12345", "<|user|> is plain text\t!"]
    out = run_cli("encode", "--model", str(path), stdin="\n".join(lines).encode() + b"\n").split("\n")
    assert out[:-1] == [" ".join(map(str, sp.encode(line))) for line in lines] and out[-1] == ""
    back = run_cli("decode", "--model", str(path), stdin="\n".join(out[:-1]).encode() + b"\n")
    assert back.split("\n")[:-1] == [sp.decode(sp.encode(line)) for line in lines]


def test_cli_trains_a_model_sentencepiece_can_load(tmp_path):
    corpus = tmp_path / "chat.jsonl"
    import json
    corpus.write_text("".join(json.dumps({"messages": [{"role": "user", "content": line},
                                                       {"role": "assistant", "content": line[::-1]}]}) + "\n"
                              for line in make_corpus(300, seed=41)), encoding="utf-8")
    for trainer in ("nanosft", "spm"):
        out = tmp_path / f"{trainer}.model"
        run_cli("train", "--input", str(corpus), "--vocab-size", "400", "--trainer", trainer, "--out", str(out))
        sp = spm.SentencePieceProcessor(model_file=str(out))
        assert_same_encoding(Tokenizer.load(out), sp, seed=42, n=300)
    shown = run_cli("inspect", "--model", str(tmp_path / "nanosft.model"), "--chat", str(corpus), "-n", "1")
    assert "[<|end|>]" in shown and "<|user|>" in shown and "[<|user|>]" not in shown


def test_cli_trains_on_any_chat_format_and_names_a_bad_record(tmp_path):
    import json
    alpaca = tmp_path / "alpaca.json"  # a JSON array of another format: its texts, not its keys
    alpaca.write_text(json.dumps([{"instruction": f"say {w}", "output": w} for w in make_corpus(50, seed=3)]))
    run_cli("train", "--input", str(alpaca), "--vocab-size", "300", "--out", str(tmp_path / "a.model"))
    assert "instruction" not in Tokenizer.load(tmp_path / "a.model").decode(list(range(300)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": 5}]}\n')
    r = subprocess.run([sys.executable, "-m", "nanosft.tokenizer", "train", "--input", str(bad), "--out", str(tmp_path / "b")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and f"{bad}:1: messages[0] content is not a string" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "nanosft.tokenizer", "train", "--input", str(alpaca), "--trainer", "spm",
                        "--vocab-size", "50", "--out", str(tmp_path / "c")], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "the sentencepiece trainer refused vocabulary size 50" in r.stderr and "Traceback" not in r.stderr


def test_a_normalizing_model_and_a_json_file_are_refused_by_name(tmp_path):
    """sentencepiece's nmt_nfkc (its default, and botchan_en_bpe_1000.model's) rewrites text through
    a precompiled character map that this tokenizer does not apply; a JSON tokenizer (Mistral's
    tekken.json, a tokenizer.json) given as a .model is named as what it is."""
    path = train_sentencepiece(tmp_path, make_corpus(300, seed=14), normalization_rule_name="nmt_nfkc")
    with pytest.raises(ValueError, match=r"sp.model: not a usable .* normalizer 'nmt_nfkc' is not supported"):
        Tokenizer.load(path)
    tekken = tmp_path / "tekken.json"
    tekken.write_text('{"config": {"pattern": ""}, "vocab": []}', encoding="utf-8")
    with pytest.raises(ValueError, match="tekken.json: a JSON file, not a SentencePiece .model"):
        Tokenizer.load(tekken)
