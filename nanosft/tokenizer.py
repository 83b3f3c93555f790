"""
A byte-fallback BPE tokenizer in the SentencePiece style, written from scratch.

Text enters the project here: the chat template turns a conversation into plain
text segments plus the control tokens in `Tokenizer.SPECIALS`, this module turns
each text segment into token ids, and the data pipeline concatenates them.

The on-disk format is SentencePiece's own `.model` protobuf, read and written by
hand below, so the same class can load a Llama-family `tokenizer.model` and a
file saved here loads in the `sentencepiece` library. Encoding follows the
library's BPE algorithm step for step (normalize, split into characters, merge
the best-scoring adjacent pair until none is left, fall back to UTF-8 bytes),
which is what lets the tests demand identical ids.

Known quirk, shared with sentencepiece: the character "▁" (U+2581) is how a
space is spelled inside pieces, so a literal "▁" in the input decodes as " ".
"""

import codecs
import heapq
import re
import struct
from collections import Counter, defaultdict

# Piece types of sentencepiece_model.proto (ModelProto.SentencePiece.Type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE = 2  # TrainerSpec.ModelType; the proto default (1) is UNIGRAM
SPACE = "\u2581"  # "▁", stands for " " inside pieces
MAX_PIECE_LENGTH = 16  # characters; sentencepiece's default max_sentencepiece_length

# ----------------------------------------------------------------------------
# Protobuf wire format: just enough to read and write sentencepiece models.
# Each schema maps a field name to (field number, kind, proto default). Fields
# not named here are kept as raw (number, wire type, value) triples and written
# back unchanged, so re-saving a model loses nothing.

PIECE_FIELDS = {"piece": (1, "str", ""), "score": (2, "float", 0.0), "type": (3, "int", NORMAL)}
TRAINER_FIELDS = {
    "model_type": (3, "int", 1), "vocab_size": (4, "int", 8000),
    "treat_whitespace_as_suffix": (24, "bool", False), "split_digits": (25, "bool", False),
    "byte_fallback": (35, "bool", False),
    "unk_id": (40, "int", 0), "bos_id": (41, "int", 1),
    "eos_id": (42, "int", 2), "pad_id": (43, "int", -1),
    "unk_surface": (44, "str", " \u2047 "),
    "unk_piece": (45, "str", "<unk>"), "bos_piece": (46, "str", "<s>"),
    "eos_piece": (47, "str", "</s>"), "pad_piece": (48, "str", "<pad>"),
}
NORMALIZER_FIELDS = {
    "name": (1, "str", ""), "precompiled_charsmap": (2, "bytes", b""),
    "add_dummy_prefix": (3, "bool", True), "remove_extra_whitespaces": (4, "bool", True),
    "escape_whitespaces": (5, "bool", True),
}
WIRE_TYPE = {"int": 0, "bool": 0, "str": 2, "bytes": 2, "float": 5}


def _read_varint(buf, pos):
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _varint(value):
    value &= (1 << 64) - 1  # negative int32/int64 are written as 10-byte two's complement
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _iter_fields(buf):
    """Yield (field number, wire type, value): an int for varints, bytes otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire in (1, 2, 5):
            size = {1: 8, 5: 4}.get(wire)
            if size is None:
                size, pos = _read_varint(buf, pos)
            if pos + size > len(buf):
                raise ValueError("truncated field")
            value, pos = bytes(buf[pos:pos + size]), pos + size
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if number == 0:
            raise ValueError("invalid field number 0")
        yield number, wire, value


def _parse(buf, schema):
    """Split a message into ({name: value} for known fields, [raw unknown fields])."""
    by_number = {number: (name, kind) for name, (number, kind, _) in schema.items()}
    known, unknown = {}, []
    for number, wire, value in _iter_fields(buf):
        name, kind = by_number.get(number, (None, None))
        if name is None or WIRE_TYPE[kind] != wire:
            unknown.append((number, wire, value))
        elif kind == "int":
            known[name] = value - (1 << 64) if value >> 63 else value
        elif kind == "bool":
            known[name] = bool(value)
        elif kind == "str":
            known[name] = value.decode("utf-8")
        elif kind == "float":
            known[name] = struct.unpack("<f", value)[0]
        else:
            known[name] = value
    return known, unknown


def _serialize(known, unknown, schema):
    """Inverse of _parse. Fields go out in field-number order, as protobuf's C++ writer does."""
    fields = list(unknown)
    for name, value in known.items():
        number, kind, _ = schema[name]
        if kind == "str":
            value = value.encode("utf-8")
        elif kind == "float":
            value = struct.pack("<f", value)
        fields.append((number, WIRE_TYPE[kind], int(value) if WIRE_TYPE[kind] == 0 else value))
    out = bytearray()
    for number, wire, value in sorted(fields, key=lambda f: f[0]):  # stable: repeated fields keep order
        out += _varint(number << 3 | wire)
        out += _varint(value) if wire == 0 else (_varint(len(value)) + value if wire == 2 else value)
    return bytes(out)


# ----------------------------------------------------------------------------
# Normalization and decoding helpers, mirroring sentencepiece's normalizer.cc
# with the "identity" rule (no Unicode normalization).

def _normalize(text, add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces):
    if remove_extra_whitespaces:
        text = re.sub(" +", " ", text.lstrip(" "))
    if not text:
        return ""
    if add_dummy_prefix:
        text = " " + text
    if escape_whitespaces:
        text = text.replace(" ", SPACE)
    if remove_extra_whitespaces:  # trailing spaces go after escaping, so a literal "▁" counts too
        text = text.rstrip(SPACE if escape_whitespaces else " ")
    return text


# Byte pieces that are not valid UTF-8 decode to one U+FFFD per bad byte, as in
# sentencepiece; Python's "replace" would fold a truncated sequence into one U+FFFD.
codecs.register_error("nanosft.byte_replace", lambda err: ("\ufffd", err.start + 1))


# Training words: "▁" plus the non-whitespace characters after it, or a run of other
# whitespace ("\n\n", "\t") on its own. No piece can span two words, so "▁" only ever
# starts a piece (which keeps encoding cacheable per word) and newlines never glue
# onto the text around them.
_TRAIN_WORD = re.compile(f"{SPACE}?[^\\s{SPACE}]+|{SPACE}?\\s+|{SPACE}")


class Tokenizer:
    # control tokens of the chat template; plain text can never produce them
    CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")  # the chat template's markers
    SPECIALS = ("<unk>", "<s>", "</s>", "<pad>") + CHAT_TOKENS

    def __init__(self, pieces, trainer=None, normalizer=None, unknown_fields=None):
        """pieces: list of (piece, score, type); trainer/normalizer: the known fields
        of TrainerSpec/NormalizerSpec that are set (absent ones take proto defaults)."""
        self.pieces = [(str(p), float(s), int(t)) for p, s, t in pieces]
        self.trainer = dict(trainer or {})
        self.normalizer = dict(normalizer or {})
        self._unknown_fields = unknown_fields or {"model": [], "trainer": [], "normalizer": []}
        self._setup()

    def _option(self, name):
        for spec, schema in ((self.trainer, TRAINER_FIELDS), (self.normalizer, NORMALIZER_FIELDS)):
            if name in schema:
                return spec.get(name, schema[name][2])
        raise KeyError(name)

    def _setup(self):
        """Derive the lookup tables encode/decode need, rejecting what we cannot reproduce."""
        if self._option("model_type") != BPE:
            raise ValueError("only BPE models are supported (model_type must be BPE)")
        if self._option("precompiled_charsmap") or self._option("treat_whitespace_as_suffix"):
            raise ValueError("only the 'identity' normalizer with whitespace as prefix is supported")
        self._norm_args = tuple(self._option(name) for name in (
            "add_dummy_prefix", "remove_extra_whitespaces", "escape_whitespaces"))
        self._byte_fallback = self._option("byte_fallback")
        # Like sentencepiece, keep two maps: pieces BPE may create (NORMAL, USER_DEFINED,
        # UNUSED) and reserved ones; a reserved spelling wins when looking up an id.
        mergeable, reserved, self._byte_of_id = {}, {}, {}
        for i, (piece, _, kind) in enumerate(self.pieces):
            table = mergeable if kind in (NORMAL, USER_DEFINED, UNUSED) else reserved
            if piece in table:
                raise ValueError(f"piece {piece!r} is defined twice")
            table[piece] = i
            if kind == BYTE:
                self._byte_of_id[i] = int(piece[3:5], 16)
        self._ids = {**mergeable, **reserved}
        self._scores = {p: self.pieces[i][1] for p, i in mergeable.items()}
        self._unused = {p for p, i in mergeable.items() if self.pieces[i][2] == UNUSED}
        self._user_defined = defaultdict(list)  # first char -> pieces, longest first
        user_defined = [p for p, i in mergeable.items() if self.pieces[i][2] == USER_DEFINED]
        for p in sorted(user_defined, key=len, reverse=True):
            self._user_defined[p[0]].append(p)
        unknowns = [i for i, (_, _, kind) in enumerate(self.pieces) if kind == UNKNOWN]
        if not unknowns:
            raise ValueError("the vocabulary has no UNKNOWN piece")
        self._unk = unknowns[0]
        if self._byte_fallback:
            try:
                self._byte_ids = [reserved["<0x%02X>" % b] for b in range(256)]
            except KeyError as e:
                raise ValueError(f"byte_fallback is set but byte piece {e} is missing") from None

        def special_id(name, kind):  # as SentencePieceProcessor.bos_id() etc.: -1 if not there
            i = self._ids.get(self._option(name))
            return i if i is not None and self.pieces[i][2] == kind else -1
        self.unk_id = special_id("unk_piece", UNKNOWN)
        self.bos_id = special_id("bos_piece", CONTROL)
        self.eos_id = special_id("eos_piece", CONTROL)
        self.pad_id = special_id("pad_piece", CONTROL)

        # Merges never create a piece that is not in the vocabulary. If "▁" only ever
        # starts a piece, no merge can cross the point before a "▁", so text can be
        # cut there and each word encoded once and cached. Llama-style vocabularies
        # also hold whitespace runs ("▁▁▁▁"); if "▁" only appears in a leading run,
        # cutting before a "▁" that follows a non-"▁" character is safe as well.
        if all(SPACE not in p[1:] for p in mergeable):
            self._chunker = re.compile(f"{SPACE}[^{SPACE}]*|[^{SPACE}]+")
        elif all(SPACE not in p.lstrip(SPACE) for p in mergeable):
            self._chunker = re.compile(f"{SPACE}*[^{SPACE}]+|{SPACE}+")
        else:
            self._chunker = None
        self._cache = {}

    def with_control_tokens(self, names):
        """This tokenizer plus `names` as CONTROL pieces at the end (those it lacks): how a base
        model's vocabulary gains the chat template's markers."""
        new = [(name, 0.0, CONTROL) for name in names if name not in self._ids]
        if not new:
            return self
        trainer = {**self.trainer, "vocab_size": len(self.pieces) + len(new)}
        return Tokenizer(self.pieces + new, trainer, self.normalizer, self._unknown_fields)

    @property
    def vocab_size(self):
        return len(self.pieces)

    def token_id(self, piece):
        if piece not in self._ids:
            raise KeyError(f"piece {piece!r} is not in the vocabulary")
        return self._ids[piece]

    def id_to_piece(self, i):
        return self.pieces[i][0]

    # ------------------------------------------------------------------ encode

    def encode(self, text):
        """Token ids of `text`; no BOS/EOS are added."""
        normalized = _normalize(text, *self._norm_args)
        if self._chunker is None:
            ids = list(self._encode_chunk(normalized))
        else:
            ids = []
            for word in self._chunker.findall(normalized):
                cached = self._cache.get(word)
                if cached is None:
                    if len(self._cache) > 1_000_000:  # keep memory bounded on huge corpora
                        self._cache.clear()
                    cached = self._cache[word] = self._encode_chunk(word)
                ids.extend(cached)
        if not self._byte_fallback and self._unk in ids:  # sentencepiece folds runs of <unk> into one
            ids = [i for k, i in enumerate(ids) if not (k and i == ids[k - 1] == self._unk)]
        return ids

    def _encode_chunk(self, text):
        ids = []
        for symbol in self._bpe(*self._split_symbols(text)):
            i = self._ids.get(symbol)
            # a leftover UNUSED piece (no merge produced it) counts as unknown, as in sentencepiece
            if i is not None and self.pieces[i][2] not in (UNKNOWN, UNUSED):
                ids.append(i)
            elif self._byte_fallback:
                ids.extend(self._byte_ids[b] for b in symbol.encode("utf-8"))
            else:
                ids.append(self._unk)
        return tuple(ids)

    def _split_symbols(self, text):
        """Characters, except that USER_DEFINED pieces are matched whole (longest first)
        and frozen: they never merge with their neighbours."""
        if not self._user_defined:
            return list(text), None
        symbols, frozen, pos = [], [], 0
        while pos < len(text):
            candidates = self._user_defined.get(text[pos], ())
            match = next((p for p in candidates if text.startswith(p, pos)), None)
            symbols.append(match or text[pos])
            frozen.append(match is not None)
            pos += len(symbols[-1])
        return symbols, frozen

    def _bpe(self, symbols, frozen):
        """sentencepiece's bpe_model.cc: a heap of candidate pairs keyed by (score, position),
        symbols in a linked list; merged-away symbols become "" and stale entries are skipped."""
        n = len(symbols)
        if n < 2:
            return symbols
        scores, unused = self._scores, self._unused
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
        nxt[-1] = -1
        heap, split_of = [], {}

        def add_pair(left, right):
            if left < 0 or right < 0 or (frozen and (frozen[left] or frozen[right])):
                return
            piece = symbols[left] + symbols[right]
            score = scores.get(piece)
            if score is not None:  # highest score first, then leftmost
                heapq.heappush(heap, (-score, left, right, len(piece)))
                if piece in unused:  # remember how to split it again at the end
                    split_of[piece] = (symbols[left], symbols[right])

        for i in range(n - 1):
            add_pair(i, i + 1)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            a, b = symbols[left], symbols[right]
            if not a or not b or len(a) + len(b) != size:
                continue  # one side changed since this pair was queued
            symbols[left], symbols[right] = a + b, ""
            nxt[left] = nxt[right]
            if nxt[left] >= 0:
                prv[nxt[left]] = left
            add_pair(prv[left], left)
            add_pair(left, nxt[left])

        # UNUSED pieces may act as intermediate merge steps but are never output.
        out, stack = [], [s for s in reversed(symbols) if s]
        while stack:
            s = stack.pop()
            if s in split_of:
                stack.extend(reversed(split_of[s]))
            else:
                out.append(s)
        return out

    # ------------------------------------------------------------------ decode

    def decode(self, ids):
        """Text of `ids`, following sentencepiece's decoder: CONTROL pieces vanish, an
        UNKNOWN piece reads " ⁇ " (the model's unk_surface), runs of BYTE pieces are
        decoded as UTF-8, and the space that add_dummy_prefix put first is dropped."""
        strip_first = self._option("add_dummy_prefix") or self._option("remove_extra_whitespaces")
        out, pending = [], bytearray()
        at_start, stripped, wrote = True, False, False
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.pieces):
                raise IndexError(f"token id {i} is out of range (vocab_size={len(self.pieces)})")
            piece, _, kind = self.pieces[i]
            if kind == BYTE:
                pending.append(self._byte_of_id[i])
                continue
            if pending:
                out.append(pending.decode("utf-8", "nanosft.byte_replace"))
                pending.clear()
                wrote = True
            if stripped or wrote:
                at_start = False
            stripped = False
            if kind == CONTROL:
                piece = ""
            elif kind == UNKNOWN:
                piece = self._option("unk_surface")
            elif at_start and strip_first and piece.startswith(SPACE):
                piece = piece[1:]
                # with remove_extra_whitespaces every leading space goes, not just the first
                stripped = not self._option("remove_extra_whitespaces")
            out.append(piece.replace(SPACE, " "))
            wrote = wrote or bool(out[-1])
        if pending:
            out.append(pending.decode("utf-8", "nanosft.byte_replace"))
        return "".join(out)

    # ------------------------------------------------------------ load / save

    @classmethod
    def load(cls, path):
        with open(path, "rb") as f:
            return cls.from_bytes(f.read(), name=path)

    @classmethod
    def from_bytes(cls, data, name="<bytes>"):
        """A tokenizer from the bytes of a .model file; `name` appears in error messages."""
        try:
            pieces, specs, unknown = [], {2: ({}, []), 3: ({}, [])}, {"model": []}
            for number, wire, value in _iter_fields(data):
                if number == 1 and wire == 2:
                    piece = _parse(value, PIECE_FIELDS)[0]
                    pieces.append(tuple(piece.get(k, d) for k, (_, _, d) in PIECE_FIELDS.items()))
                elif number in (2, 3) and wire == 2:
                    specs[number] = _parse(value, TRAINER_FIELDS if number == 2 else NORMALIZER_FIELDS)
                else:
                    unknown["model"].append((number, wire, value))
            if not pieces:
                raise ValueError("no pieces")
            (trainer, unknown["trainer"]), (normalizer, unknown["normalizer"]) = specs[2], specs[3]
            return cls(pieces, trainer, normalizer, unknown)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{name}: not a usable SentencePiece BPE model: {e}") from e

    def to_bytes(self):
        """The .model file's bytes. sentencepiece writes a piece's type only when it is not
        NORMAL; so do we, so that a loaded model saves back byte for byte."""
        fields = [(1, 2, _serialize({"piece": p, "score": s, **({"type": t} if t != NORMAL else {})},
                                    [], PIECE_FIELDS)) for p, s, t in self.pieces]
        extra = self._unknown_fields
        fields.append((2, 2, _serialize(self.trainer, extra["trainer"], TRAINER_FIELDS)))
        fields.append((3, 2, _serialize(self.normalizer, extra["normalizer"], NORMALIZER_FIELDS)))
        return _serialize({}, fields + extra["model"], {})

    def save(self, path):
        with open(path, "wb") as f:
            f.write(self.to_bytes())

    # ----------------------------------------------------------------- train

    @classmethod
    def train(cls, texts, vocab_size):
        """Learn a vocabulary of at most `vocab_size` pieces: SPECIALS, 256 byte pieces,
        the most frequent characters, then BPE merges (scores -1, -2, ... in merge order)."""
        fixed = len(cls.SPECIALS) + 256
        if vocab_size <= fixed:
            raise ValueError(f"vocab_size must exceed {fixed} "
                             f"({len(cls.SPECIALS)} specials + 256 byte pieces), got {vocab_size}")
        words = Counter()
        for text in texts:
            words.update(_TRAIN_WORD.findall(_normalize(text, True, False, True)))
        chars = Counter()
        for word, count in words.items():
            for ch in word:
                chars[ch] += count
        ranked = sorted(chars, key=lambda ch: (-chars[ch], ch))
        kept = ranked[:vocab_size - fixed]  # characters that do not fit are left to byte fallback
        blocked = set(ranked[len(kept):]) | {ch for ch in chars if ch.isdigit()}  # digits stay single
        reserved = set(cls.SPECIALS) | {"<0x%02X>" % b for b in range(256)}
        merges = _learn_merges(words, vocab_size - fixed - len(kept), blocked, reserved)
        pieces = ([(p, 0.0, UNKNOWN if p == "<unk>" else CONTROL) for p in cls.SPECIALS]
                  + [("<0x%02X>" % b, 0.0, BYTE) for b in range(256)]
                  + [(ch, 0.0, NORMAL) for ch in kept]
                  + [(p, -float(k + 1), NORMAL) for k, p in enumerate(merges)])
        trainer = {"model_type": BPE, "vocab_size": len(pieces), "split_digits": True,
                   "byte_fallback": True, "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}
        normalizer = {"name": "identity", "add_dummy_prefix": True,
                      "remove_extra_whitespaces": False, "escape_whitespaces": True}
        return cls(pieces, trainer, normalizer)


    @classmethod
    def train_spm(cls, texts, vocab_size):
        """The same layout and settings as `train`, learned by the sentencepiece library: C++ and
        multi-threaded, for corpora too big for the readable trainer above. Our encoder serves
        the result like any other .model file."""
        import io
        import sentencepiece  # only needed here

        lines = (line for text in texts for line in text.split("\n") if line.strip())
        model = io.BytesIO()
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=lines, model_writer=model, model_type="bpe", vocab_size=vocab_size,
                normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
                byte_fallback=True, split_digits=True, character_coverage=0.9995, hard_vocab_limit=False,
                unk_id=0, bos_id=1, eos_id=2, pad_id=3, control_symbols=list(cls.CHAT_TOKENS),
                minloglevel=2)
        except RuntimeError as e:  # e.g. a vocabulary smaller than its special and byte pieces
            raise ValueError(f"the sentencepiece trainer refused vocabulary size {vocab_size}: {e}") from None
        tok = cls.from_bytes(model.getvalue(), name="sentencepiece trainer output")
        if [tok.id_to_piece(i) for i in range(len(cls.SPECIALS))] != list(cls.SPECIALS):
            raise ValueError("the sentencepiece trainer did not put the special tokens first")
        return tok


def _learn_merges(word_counts, max_merges, blocked, reserved):
    """Classic BPE over unique words: repeatedly merge the most frequent adjacent pair
    (ties: smallest pair), updating pair counts only for the words that contain it."""
    words = [list(w) for w in word_counts]
    freqs = list(word_counts.values())
    counts, where = Counter(), defaultdict(set)

    def pairs(symbols):
        return [(a, b) for a, b in zip(symbols, symbols[1:]) if a not in blocked and b not in blocked]

    for i, symbols in enumerate(words):
        for p in pairs(symbols):
            counts[p] += freqs[i]
            where[p].add(i)
    heap = [(-c, p) for p, c in counts.items()]
    heapq.heapify(heap)
    merges = []
    while heap and len(merges) < max_merges:
        neg_count, pair = heapq.heappop(heap)
        if -neg_count != counts[pair]:
            continue  # stale entry; the current count was pushed when it changed
        if -neg_count < 2:
            break
        merged = pair[0] + pair[1]
        if merged in reserved:  # text spelling "<s>" must never become a CONTROL id
            continue
        if len(merged) > MAX_PIECE_LENGTH:  # as sentencepiece: no whole phrases as one piece
            continue
        merges.append(merged)
        changed = set()
        for i in where.pop(pair, ()):
            old, new, k = words[i], [], 0
            while k < len(old):
                if k + 1 < len(old) and (old[k], old[k + 1]) == pair:
                    new.append(merged)
                    k += 2
                else:
                    new.append(old[k])
                    k += 1
            for p in pairs(old):
                counts[p] -= freqs[i]
                changed.add(p)
            for p in pairs(new):
                counts[p] += freqs[i]
                changed.add(p)
                where[p].add(i)
            words[i] = new
        for p in changed:
            if counts[p] > 0:
                heapq.heappush(heap, (-counts[p], p))
    return merges


# ----------------------------------------------------------------------------
# Command line:
#   python -m nanosft.tokenizer train --input data/train.jsonl --vocab-size 1024 --out tok.model
#   echo "Hello 世界" | python -m nanosft.tokenizer encode --model tok.model     # one line of ids per line
#   echo "1 2 3" | python -m nanosft.tokenizer decode --model tok.model          # one line of text per line
#   python -m nanosft.tokenizer inspect --model tok.model "Hello 世界"             # pieces with their ids
#   python -m nanosft.tokenizer inspect --model tok.model --chat data/train.jsonl  # supervised tokens in green
# --model takes a .model file (sentencepiece's or ours) or a run directory holding tokenizer.model.

def _cli_texts(paths):
    """Training text: the message contents of chat files (.jsonl, .json) in any format train.py
    reads, read and checked as it reads them; the lines of any other file."""
    from nanosft.data import load_conversations  # (a command-line helper reaching on, as below)
    for path in paths:
        if path.endswith((".jsonl", ".json")):
            for rec in load_conversations(path)[0]:
                yield from (m["content"] for m in rec["messages"])
            continue
        with open(path, "rb") as f:
            data = f.read()
        try:  # lines as a text-mode file gives them: \r\n and \r end a line too
            yield from data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n").split("\n")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise ValueError(f"{path}:{line}: invalid UTF-8 ({e.reason} at byte {e.start})") from None


def _cli_lines():
    """Lines of stdin (UTF-8), without their newline; a bad line names itself."""
    import sys
    data = sys.stdin.buffer.read()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the text after the final newline is not a line
    for n, raw in enumerate(lines, 1):
        try:
            yield n, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SystemExit(f"stdin:{n}: invalid UTF-8 ({e.reason} at byte {e.start})")


def _cli_inspect_chat(tok, path, count):
    # The chat view needs the template, which sits after the tokenizer in the data flow; only
    # this command-line helper reaches for it, the module itself never does.
    from nanosft.data import load_jsonl, show_tokens
    from nanosft.template import ChatTemplate
    import sys
    tty = sys.stdout.isatty()  # green: supervised (in the loss), red: not; plain text: [supervised]
    print("\033[32msupervised\033[0m  \033[31mnot supervised\033[0m" if tty else "[supervised]  not supervised")
    template = ChatTemplate(tok.with_control_tokens(Tokenizer.CHAT_TOKENS))  # a base model lacks them
    for rec in load_jsonl(path)[:count]:
        ids, mask = template.render(rec["messages"])
        print(show_tokens(template.tok, ids, mask, tty))
        print(f"  {len(ids)} tokens, {sum(mask)} supervised")


def main(argv=None):
    import argparse
    import os
    import sys
    p = argparse.ArgumentParser(prog="python -m nanosft.tokenizer", description="train, use and inspect tokenizers")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a tokenizer on chat JSONL or text files")
    t.add_argument("--input", nargs="+", required=True)
    t.add_argument("--vocab-size", type=int, default=1024)
    t.add_argument("--trainer", choices=["nanosft", "spm"], default="nanosft")
    t.add_argument("--out", required=True)
    for name in ("encode", "decode", "inspect"):
        c = sub.add_parser(name)
        c.add_argument("--model", required=True, help=".model file or run directory")
    sub.choices["inspect"].add_argument("text", nargs="?", help="text to show as pieces")
    sub.choices["inspect"].add_argument("--chat", help="chat JSONL: show the rendering with its loss mask")
    sub.choices["inspect"].add_argument("-n", type=int, default=3, help="conversations to show")
    args = p.parse_args(argv)
    sys.stdout.reconfigure(encoding="utf-8")
    try:
        if args.cmd == "train":
            texts = list(_cli_texts(args.input))
            tok = (Tokenizer.train_spm if args.trainer == "spm" else Tokenizer.train)(texts, args.vocab_size)
            tok.save(args.out)
            print(f"{args.out}: {tok.vocab_size} pieces from {len(texts)} texts")
            return
        path = os.path.join(args.model, "tokenizer.model") if os.path.isdir(args.model) else args.model
        tok = Tokenizer.load(path)
        if args.cmd == "encode":
            for _, line in _cli_lines():
                print(" ".join(map(str, tok.encode(line))))
        elif args.cmd == "decode":
            for n, line in _cli_lines():
                try:
                    ids = [int(x) for x in line.split()]
                    print(tok.decode(ids))
                except (ValueError, IndexError) as e:
                    raise SystemExit(f"stdin:{n}: {e}")
        elif args.chat:
            _cli_inspect_chat(tok, args.chat, args.n)
        else:
            text = args.text if args.text is not None else sys.stdin.read()
            print(" ".join(f"{tok.id_to_piece(i)}({i})" for i in tok.encode(text)))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
