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

import regex  # \p{L}, \p{N}: the Unicode classes the families' regexes are written in

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
    taken whole (Llama 3); specials {id: text}: control tokens, never produced by encode."""

    def __init__(self, vocab, merges, pre_tokenize, nfc=False, ignore_merges=False, specials=None, spec=None):
        self.vocab = vocab
        self.merges = [tuple(pair) for pair in merges]
        self.ranks = {pair: r for r, pair in enumerate(self.merges)}
        self.pre_tokenize = pre_tokenize
        self.nfc, self.ignore_merges = nfc, ignore_merges
        self.specials = dict(specials or {})
        self.spec = spec  # the tokenizer.json it came from, written back by save()
        self.tokens = {i: t for t, i in vocab.items()} | self.specials
        missing = [c for c in BYTE_CHAR.values() if c not in vocab]
        if missing:
            raise ValueError(f"the vocabulary lacks byte characters {missing[:5]}: not a byte-level BPE")
        self.cache = {}  # pre-token -> ids: text repeats its words

    @property
    def vocab_size(self):
        return max(self.tokens) + 1

    def encode(self, text):
        """Token ids of `text`; no BOS is added, and a control token's spelling in the text stays text."""
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        ids = []
        for piece in self.pre_tokenize([text]):
            if piece not in self.cache:
                self.cache[piece] = self.merge("".join(BYTE_CHAR[b] for b in piece.encode("utf-8")))
            ids += self.cache[piece]
        return ids

    def merge(self, word):
        """One pre-token, in byte characters -> ids: repeatedly merge every occurrence of the adjacent
        pair with the lowest rank, left to right, until no pair has one."""
        if self.ignore_merges and word in self.vocab:
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

    def save(self, path):
        """Write the tokenizer.json it was read from, unchanged: the tokenizers library loads it."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.spec, f, ensure_ascii=False)

    def decode(self, ids):
        """Text of `ids`: control tokens vanish, the byte characters are read back as UTF-8."""
        chars = "".join(self.tokens[int(i)] for i in ids if int(i) not in self.specials)
        return bytes(CHAR_BYTE[c] for c in chars).decode("utf-8", "replace")


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
        compiled = regex.compile(pattern["Regex"] if "Regex" in pattern else regex.escape(pattern["String"]))
        return lambda pieces: split_isolated(pieces, compiled)
    raise ValueError(f"{where}: pre-tokenizer {kind!r} is not supported (ByteLevel, Split, Digits, Sequence)")


def load_tokenizer_json(path):
    """A ByteLevelBPE from a tokenizer.json; a ValueError naming the file and the part for anything
    it cannot read or does not implement."""
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
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
        vocab = model["vocab"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        for i, (a, b) in enumerate(merges):
            if a + b not in vocab or a not in vocab or b not in vocab:
                raise ValueError(f"model.merges[{i}] {a!r} {b!r} names a token that is not in the vocabulary")
        specials = {t["id"]: t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
        return ByteLevelBPE(vocab, merges, pre_tokenizer(spec.get("pre_tokenizer") or {"type": "Sequence",
                            "pretokenizers": []}, "pre_tokenizer"), nfc=normalizer is not None,
                            ignore_merges=model.get("ignore_merges", False), specials=specials, spec=spec)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a tokenizer.json as Hugging Face writes it (missing or malformed {e})") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
