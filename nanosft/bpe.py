"""
Byte-level BPE, the tokenizer of GPT-2 and of most base models fine-tuned today (Llama 3, Qwen2 and
Qwen3, SmolLM2), written from scratch. It reads Hugging Face's `tokenizer.json` and gives the ids
the `tokenizers` library gives (tests/test_bpe.py holds it to that on thousands of strings).

    text -> [NFC] -> pre-tokens: the text cut by a regex into words, numbers, punctuation and
         whitespace runs (the model family's own regex), optionally digits cut apart
         -> each pre-token's UTF-8 bytes, one printable character per byte (GPT-2's map)
         -> merges applied by rank, lowest first, until none applies -> ids

Every one of the 256 byte characters is in the vocabulary, so any string encodes and
decode(encode(text)) == text. The other tokenizer, tokenizer.py, is SentencePiece's kind: merges by
score over characters, bytes only as a fallback.
"""

import json
import unicodedata
from collections import Counter

import regex  # \p{L}, \p{N}: the Unicode classes the families' regexes are written in

from nanosft.tokenizer import learn_merges

# GPT-2's pre-tokenizer (the ByteLevel pre-tokenizer's own regex) and the Split regexes of Llama 3
# and Qwen2, as their tokenizer.json files spell them. Qwen2 takes digits one at a time.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
GPT2_REGEX = regex.compile(GPT2_PATTERN)
DIGIT, DIGITS = regex.compile(r"[0-9]"), regex.compile(r"[0-9]+")  # the Digits pre-tokenizer: ASCII only
NO_MERGE = float("inf")  # the rank of a pair that is not a merge


def bytes_to_unicode():
    """GPT-2's map {byte: character}: printable Latin-1 bytes stand for themselves, the other 68
    (control characters, space, ...) take the characters from U+0100 on, in order. Every byte
    string is then a string of visible characters; a space reads "Ġ", a newline "Ċ"."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


BYTE_CHAR = bytes_to_unicode()
CHAR_BYTE = {c: b for b, c in BYTE_CHAR.items()}


# ---- pre-tokenizers: each turns a list of pieces into a finer one

def split_isolated(pieces, pattern):
    """Every match of `pattern` a piece of its own, and so is the text between matches
    (tokenizers' Split with behavior "Isolated")."""
    out = []
    for piece in pieces:
        start = 0
        for m in pattern.finditer(piece):
            if m.start() > start:
                out.append(piece[start:m.start()])
            out.append(m.group())
            start = m.end()
        if start < len(piece):
            out.append(piece[start:])
    return out


def split_digits(pieces, individual):
    """ASCII digits cut out of the text: one piece per digit, or per run of digits."""
    return split_isolated(pieces, DIGIT if individual else DIGITS)


def byte_level(pieces, add_prefix_space, use_regex):
    """Optionally a space before each piece that lacks one, then GPT-2's regex over it."""
    if add_prefix_space:
        pieces = [p if p.startswith(" ") else " " + p for p in pieces]
    return split_isolated(pieces, GPT2_REGEX) if use_regex else pieces



class ByteLevelBPE:
    """vocab {token: id}; merges [(left, right), ...] in rank order; pre_tokenize: pieces -> pieces;
    nfc: normalize to NFC first; ignore_merges: a pre-token that is itself in the vocabulary is
    taken whole (Llama 3); added: tokenizer.json's "added_tokens". The "special" ones are control
    tokens, which encode never produces (a user who types "<|im_end|>" cannot end a turn), the
    others are matched in the text as the file says. spec: the tokenizer.json, written back by save."""

    FILE = "tokenizer.json"  # its name in a model directory (tokenizer.py's is "tokenizer.model")

    def __init__(self, vocab, merges, pre_tokenize, nfc=False, ignore_merges=False, added=(), spec=None, roles=None):
        self.vocab = vocab
        self.merges = [tuple(pair) for pair in merges]
        self.ranks = {pair: r for r, pair in enumerate(self.merges)}
        self.pre_tokenize = pre_tokenize
        self.nfc, self.ignore_merges = nfc, ignore_merges
        self.added = [dict(t) for t in added]
        self.spec = spec
        self.tokens = {i: t for t, i in vocab.items()} | {t["id"]: t["content"] for t in self.added}
        self.ids = {**vocab, **{t["content"]: t["id"] for t in self.added}}  # token -> id, added ones too
        self.controls = {t["id"] for t in self.added if t.get("special")}
        self.texts = {t["id"] for t in self.added if not t.get("special")}  # decoded as written, not as bytes
        missing = [c for c in BYTE_CHAR.values() if c not in vocab]
        if missing:
            raise ValueError(f"the vocabulary lacks byte characters {missing[:5]}: not a byte-level BPE")
        # the non-special added tokens, matched in the raw text or, "normalized", in the NFC text
        self.raw_added = added_pattern([t for t in self.added if not t.get("special") and not t.get("normalized")])
        self.normalized_added = added_pattern([{**t, "content": unicodedata.normalize("NFC", t["content"]) if nfc
                                                else t["content"]} for t in self.added
                                               if not t.get("special") and t.get("normalized")])
        self.set_roles(roles or {})
        self.unk_id = -1  # every byte has a token: nothing is unknown
        self.base_size = self.vocab_size  # tokens before with_control_tokens added any
        self.chat_template = None  # the Jinja chat template that came with it (tokenizer_dir.py sets it)
        self.cache = {}  # pre-token -> ids: text repeats its words

    def set_roles(self, roles):
        """roles {"bos", "eos", "pad"} -> token (roles_of's): the ids bos_id, eos_id, pad_id (-1: none)."""
        self.roles = dict(roles)
        self.bos_id, self.eos_id, self.pad_id = (self.ids.get(self.roles.get(r), -1) for r in ("bos", "eos", "pad"))

    @property
    def vocab_size(self):
        return max(self.tokens) + 1

    def token_id(self, token):
        i = self.ids.get(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i

    def id_to_piece(self, i):
        return self.tokens[i]

    # ------------------------------------------------------------------ encode

    def encode(self, text):
        """Token ids of `text`; no BOS is added, and a control token's spelling in the text stays text."""
        ids = []
        for piece in split_added(text, self.raw_added, ids):
            if self.nfc:
                piece = unicodedata.normalize("NFC", piece)
            for part in split_added(piece, self.normalized_added, ids):
                for word in self.pre_tokenize([part]):
                    if word not in self.cache:
                        self.cache[word] = self.merge("".join(BYTE_CHAR[b] for b in word.encode("utf-8")))
                    ids += self.cache[word]
        return ids

    def merge(self, word):
        """One pre-token, in byte characters -> ids: repeatedly merge every occurrence of the adjacent
        pair with the lowest rank, left to right, until no pair has one."""
        if self.ignore_merges and word in self.vocab and self.vocab[word] not in self.controls:
            return [self.vocab[word]]
        parts = list(word)
        while len(parts) > 1:
            best = min(self.ranks.get(pair, NO_MERGE) for pair in zip(parts, parts[1:]))
            if best == NO_MERGE:
                break
            first, second = self.merges[best]
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return [self.vocab[p] for p in parts]

    # ------------------------------------------------------------------ decode

    def decode(self, ids):
        """Text of `ids`: control tokens vanish, added tokens read as written, the others' byte
        characters are read back as UTF-8 (a byte sequence cut short reads U+FFFD)."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if i not in self.tokens:
                raise IndexError(f"token id {i} is not in the vocabulary (vocab_size={self.vocab_size})")
            if i in self.texts:
                out += self.tokens[i].encode("utf-8")
            elif i not in self.controls:
                out += bytes(CHAR_BYTE[c] for c in self.tokens[i])
        return out.decode("utf-8", "replace")

    # ------------------------------------------------------------------ files

    def with_control_tokens(self, names):
        """This tokenizer plus `names` as special added tokens after the last id (those it lacks):
        how a base model's vocabulary gains the chat template's markers."""
        new = [name for name in names if name not in self.ids]
        if not new:
            return self
        spec = json.loads(self.to_bytes())
        spec["added_tokens"] = spec.get("added_tokens") or []
        for k, name in enumerate(new):
            spec["added_tokens"].append({"id": self.vocab_size + k, "content": name, "single_word": False,
                                         "lstrip": False, "rstrip": False, "normalized": False, "special": True})
        tok = from_spec(spec, "with_control_tokens", self.roles)
        tok.base_size, tok.chat_template = self.base_size, self.chat_template
        return tok

    def to_bytes(self):
        """The tokenizer.json's bytes, as the tokenizers library reads them."""
        return json.dumps(self.spec, ensure_ascii=False, indent=1).encode("utf-8")

    def save(self, path):
        with open(path, "wb") as f:
            f.write(self.to_bytes())

    # ------------------------------------------------------------------ train

    SPECIALS = ("<s>", "</s>", "<pad>")  # BOS, EOS, padding of a trained vocabulary

    @classmethod
    def check_vocab_size(cls, vocab_size, controls=()):
        """-> the special tokens of a trained vocabulary; a ValueError unless vocab_size leaves room for
        merges after them and the 256 bytes (train.py checks its flag with this before reading data)."""
        specials = list(dict.fromkeys([*cls.SPECIALS, *controls]))
        if vocab_size <= len(specials) + 256:
            raise ValueError(f"vocab_size must exceed {len(specials) + 256} ({len(specials)} special tokens + 256 "
                             f"bytes), got {vocab_size}")
        return specials

    @classmethod
    def train(cls, texts, vocab_size, controls=()):
        """Learn a byte-level BPE of at most `vocab_size` tokens from `texts`, cut into pre-tokens by
        Llama 3's regex: the 256 byte characters, merges (tokenizer.py's learn_merges over the
        pre-tokens' byte strings), then SPECIALS and `controls` as special added tokens."""
        specials = cls.check_vocab_size(vocab_size, controls)
        words = Counter()
        split = regex.compile(LLAMA3_PATTERN)
        for text in texts:
            words.update("".join(BYTE_CHAR[b] for b in w.encode("utf-8")) for w in split.findall(text))
        alphabet = [BYTE_CHAR[b] for b in range(256)]
        merges = learn_merges(words, vocab_size - len(specials) - 256, reserved=set(specials))
        vocab = {t: i for i, t in enumerate(alphabet + [a + b for a, b in merges])}
        spec = {"version": "1.0", "truncation": None, "padding": None,  # special tokens after the vocabulary, as in Llama 3
                "added_tokens": [{"id": len(vocab) + i, "content": t, "single_word": False, "lstrip": False,
                                  "rstrip": False, "normalized": False, "special": True} for i, t in enumerate(specials)],
                "normalizer": None,
                "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
                    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
                "post_processor": {"type": "TemplateProcessing",
                                   "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                              {"Sequence": {"id": "A", "type_id": 0}}],
                                   "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                            {"Sequence": {"id": "A", "type_id": 0}},
                                            {"Sequence": {"id": "B", "type_id": 1}}],
                                   "special_tokens": {"<s>": {"id": "<s>", "ids": [len(vocab)], "tokens": ["<s>"]}}},
                "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
                "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                          "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                          "ignore_merges": True, "vocab": vocab, "merges": [list(m) for m in merges]}}
        return from_spec(spec, "trained", {"bos": "<s>", "eos": "</s>", "pad": "<pad>"})


def added_pattern(tokens):
    """A regex matching any of the added tokens, longest first, with the whitespace their lstrip and
    rstrip absorb; a match's group name is "t<id>". None when there are none."""
    if not tokens:
        return None
    alternatives = [f"(?P<t{t['id']}>" + (r"\s*" if t.get("lstrip") else "") + regex.escape(t["content"])
                    + (r"\s*" if t.get("rstrip") else "") + ")" for t in sorted(tokens, key=lambda t: -len(t["content"]))]
    return regex.compile("|".join(alternatives))


def split_added(text, pattern, ids):
    """The stretches of `text` between matches of `pattern` (added_pattern's), in order; each match
    appends its token's id to `ids` in its place (a generator: the caller encodes a stretch before
    the match after it is appended)."""
    if pattern is None:
        if text:
            yield text
        return
    start = 0
    for m in pattern.finditer(text):
        if m.start() > start:
            yield text[start:m.start()]
        ids.append(int(m.lastgroup[1:]))
        start = m.end()
    if start < len(text):
        yield text[start:]


# ---- tokenizer.json: Hugging Face's file, read by hand

def pre_tokenizer(spec, where):
    """tokenizer.json's "pre_tokenizer" -> a function pieces -> pieces; refuses by name what it
    does not implement."""
    kind = spec.get("type")
    if kind == "Sequence":
        steps = [pre_tokenizer(s, f"{where}.pretokenizers[{i}]") for i, s in enumerate(spec["pretokenizers"])]

        def run(pieces):
            for step in steps:
                pieces = step(pieces)
            return pieces
        return run
    if kind == "ByteLevel":
        return lambda pieces: byte_level(pieces, spec.get("add_prefix_space", False), spec.get("use_regex", True))
    if kind == "Digits":
        return lambda pieces: split_digits(pieces, spec.get("individual_digits", False))
    if kind == "Split":
        if spec.get("behavior") != "Isolated" or spec.get("invert"):
            raise ValueError(f"{where}: Split with behavior {spec.get('behavior')!r}"
                             f"{' inverted' if spec.get('invert') else ''} is not supported (only Isolated)")
        pattern = spec["pattern"]
        try:
            compiled = regex.compile(pattern["Regex"] if "Regex" in pattern else regex.escape(pattern["String"]))
        except regex.error as e:
            raise ValueError(f"{where}: the Split pattern does not compile ({e})") from None
        return lambda pieces: split_isolated(pieces, compiled)
    raise ValueError(f"{where}: pre-tokenizer {kind!r} is not supported (ByteLevel, Split, Digits, Sequence)")


def post_processor_bos(spec, where):
    """The BOS the "post_processor" puts before every text (TemplateProcessing's leading special token,
    as in Llama 3), or None; refuses by name the processors it does not implement."""
    kind = (spec or {}).get("type")
    if kind in (None, "ByteLevel"):  # ByteLevel's only concerns offsets
        return None
    if kind == "Sequence":
        found = [post_processor_bos(p, f"{where}.processors[{i}]") for i, p in enumerate(spec["processors"])]
        return next((b for b in found if b), None)
    if kind == "TemplateProcessing":
        first = spec["single"][0] if spec["single"] else {}
        return spec["special_tokens"][first["SpecialToken"]["id"]]["tokens"][0] if "SpecialToken" in first else None
    raise ValueError(f"{where}: post-processor {kind!r} is not supported (TemplateProcessing, ByteLevel, Sequence)")


def roles_of(spec, config, config_path="tokenizer_config.json"):
    """{"bos", "eos", "pad"} -> token, from tokenizer.json's post-processor and tokenizer_config.json
    (`config`), else from the names such tokens usually have; a ValueError naming config_path for a
    special token it names that is not there."""
    names = {t["content"] for t in spec.get("added_tokens") or []}
    known = names | set(spec["model"]["vocab"])
    given = {}
    for role in ("bos", "eos", "pad"):
        value = config.get(f"{role}_token")
        name = value.get("content") if isinstance(value, dict) else value
        if name is not None and (not isinstance(name, str) or name not in known):
            raise ValueError(f"{config_path}: {role}_token {value!r} is not a token of the tokenizer")
        given[role] = name
    bos = post_processor_bos(spec.get("post_processor"), "post_processor")
    if bos is None and config.get("add_bos_token"):
        bos = given["bos"]
    eos = given["eos"] or next((n for n in ("<|end_of_text|>", "<|endoftext|>", "</s>") if n in names), None)
    pad = given["pad"] or ("<pad>" if "<pad>" in names else None)
    return {"bos": bos, "eos": eos, "pad": pad}


def from_spec(spec, where, roles=None):
    """A ByteLevelBPE from a tokenizer.json's content; a ValueError starting with `where` for anything
    it cannot read or does not implement."""
    try:
        model = spec["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"model type {model.get('type')!r} is not supported (only BPE)")
        normalizer = spec.get("normalizer")
        if normalizer is not None and normalizer.get("type") != "NFC":
            raise ValueError(f"normalizer {normalizer.get('type')!r} is not supported (NFC or none)")
        decoder = spec.get("decoder")
        if decoder is not None and decoder.get("type") != "ByteLevel":
            raise ValueError(f"decoder {decoder.get('type')!r} is not supported (ByteLevel)")
        for field in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(field):
                raise ValueError(f"model.{field} {model[field]!r} is not supported")
        vocab = model["vocab"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        for i, (a, b) in enumerate(merges):
            if a + b not in vocab or a not in vocab or b not in vocab:
                raise ValueError(f"model.merges[{i}] {a!r} {b!r} names a token that is not in the vocabulary")
        added = spec.get("added_tokens") or []
        for i, t in enumerate(added):
            if not isinstance(t["id"], int) or not isinstance(t["content"], str) or not t["content"]:
                raise ValueError(f"added_tokens[{i}]: needs a whole-number id and a non-empty content")
            if t.get("single_word"):
                raise ValueError(f"added_tokens[{i}] {t['content']!r}: single_word is not supported")
        pre = pre_tokenizer(spec.get("pre_tokenizer") or {"type": "Sequence", "pretokenizers": []}, "pre_tokenizer")
        return ByteLevelBPE(vocab, merges, pre, nfc=normalizer is not None, ignore_merges=model.get("ignore_merges", False),
                            added=added, spec=spec, roles=roles if roles is not None else roles_of(spec, {}))
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"{where}: not a tokenizer.json as Hugging Face writes it (missing or malformed {e})") from None
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def load_tokenizer_json(path, config=None, config_path="tokenizer_config.json"):
    """A ByteLevelBPE from a tokenizer.json, with BOS/EOS/padding from tokenizer_config.json's
    content (`config`, read from config_path) where given; a ValueError naming the file and the part
    for anything it cannot read or does not implement."""
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: not a tokenizer.json as Hugging Face writes it (a JSON {type(spec).__name__})")
    tok = from_spec(spec, str(path))  # (checks the file, post-processor included, before the config is read)
    tok.set_roles(roles_of(spec, config or {}, config_path))
    return tok
