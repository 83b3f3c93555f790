"""
A byte-fallback BPE tokenizer in the SentencePiece style, written from scratch.

Text enters the project here: the chat template (template.py) turns a conversation into plain
text segments plus the control tokens in `Tokenizer.SPECIALS`, this module turns each text segment
into token ids, and the data pipeline concatenates them.

Encoding follows the sentencepiece library's BPE algorithm step for step (normalize, split into
characters, merge the best-scoring adjacent pair until none is left, fall back to UTF-8 bytes),
which is what lets the tests demand identical ids. The vocabulary is stored in SentencePiece's own
`.model` file (spm_model.py reads and writes it), so the same class loads a Llama-family
`tokenizer.model`, and a file saved here loads in the `sentencepiece` library. The other kind,
byte-level BPE (Llama 3, Qwen, SmolLM2), is bpe.py; tokenizer_dir.py loads either from disk.

Known quirk, shared with sentencepiece: the character "▁" (U+2581) is how a space is spelled
inside pieces, so a literal "▁" in the input decodes as " ".
"""

import codecs
import heapq
import re
from collections import Counter, defaultdict

from nanosft.spm_model import (BPE, BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, option, read_model,
                               train_with_sentencepiece, write_model)

SPACE = "\u2581"  # "▁", stands for " " inside pieces
MAX_PIECE_LENGTH = 16  # characters; sentencepiece's default max_sentencepiece_length
# Characters get a piece of their own, most frequent first, until they cover this share of all
# character occurrences (sentencepiece's default character_coverage); the rare rest is spelled in
# UTF-8 bytes. Without it, a corpus with thousands of rare characters (any Chinese text) would
# spend the whole vocabulary on them and leave no room for merges.
CHARACTER_COVERAGE = 0.9995

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
    FILE = "tokenizer.model"  # its name in a model directory (bpe.py's is "tokenizer.json")

    def __init__(self, pieces, trainer=None, normalizer=None, unknown_fields=None):
        """pieces: list of (piece, score, type); trainer/normalizer: the known fields
        of TrainerSpec/NormalizerSpec that are set (absent ones take proto defaults)."""
        self.pieces = [(str(p), float(s), int(t)) for p, s, t in pieces]
        self.trainer = dict(trainer or {})
        self.normalizer = dict(normalizer or {})
        self._unknown_fields = unknown_fields or {"model": [], "trainer": [], "normalizer": []}
        self.base_size = len(self.pieces)  # pieces before with_control_tokens added any
        self.chat_template = None  # the Jinja chat template that came with it (tokenizer_dir.py sets it)
        self._setup()

    def _option(self, name):
        return option(self.trainer, self.normalizer, name)

    def _setup(self):
        """Derive the lookup tables encode/decode need, rejecting what we cannot reproduce."""
        if self._option("model_type") != BPE:
            raise ValueError("only BPE models are supported (model_type must be BPE)")
        if self._option("precompiled_charsmap"):  # nmt_nfkc, nfkc, ...: a character map we do not apply
            raise ValueError(f"its normalizer {self.normalizer.get('name') or 'precompiled map'!r} is not supported: "
                             "only 'identity' (no Unicode normalization), as Llama-family models use")
        if self._option("treat_whitespace_as_suffix"):
            raise ValueError("whitespace as a suffix (treat_whitespace_as_suffix) is not supported")
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
        tok = Tokenizer(self.pieces + new, trainer, self.normalizer, self._unknown_fields)
        tok.base_size = self.base_size  # a base model's embedding has rows for these only
        tok.chat_template = self.chat_template
        return tok

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
                    cached = self._encode_chunk(word)
                    if len(word) <= 64:  # words repeat; a long run of text without spaces hardly does
                        if len(self._cache) > 1_000_000:  # keep memory bounded on huge corpora
                            self._cache.clear()
                        self._cache[word] = cached
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
            return cls(*read_model(data))
        except (ValueError, UnicodeDecodeError) as e:
            if data.lstrip()[:1] in (b"{", b"["):  # tokenizer.json, tekken.json: text, not a protobuf
                raise ValueError(f"{name}: a JSON file, not a SentencePiece .model (a byte-level BPE "
                                 "tokenizer.json goes with its model directory, not here)") from None
            raise ValueError(f"{name}: not a usable SentencePiece BPE model: {e}") from e

    def to_bytes(self):
        """The .model file's bytes (spm_model.py)."""
        return write_model(self.pieces, self.trainer, self.normalizer, self._unknown_fields)

    def save(self, path):
        with open(path, "wb") as f:
            f.write(self.to_bytes())

    # ----------------------------------------------------------------- train

    @classmethod
    def check_vocab_size(cls, vocab_size):
        """A ValueError unless a trained vocabulary of vocab_size pieces has room for more than its
        fixed pieces (train.py checks its flag with this before any data is read)."""
        fixed = len(cls.SPECIALS) + 256
        if vocab_size <= fixed:
            raise ValueError(f"vocab_size must exceed {fixed} ({len(cls.SPECIALS)} specials + 256 byte pieces), "
                             f"got {vocab_size}")

    @classmethod
    def train(cls, texts, vocab_size):
        """Learn a vocabulary of at most `vocab_size` pieces: SPECIALS, 256 byte pieces,
        the most frequent characters (up to CHARACTER_COVERAGE), then BPE merges (scores -1, -2, ... in merge order)."""
        cls.check_vocab_size(vocab_size)
        fixed = len(cls.SPECIALS) + 256
        words = Counter()
        for text in texts:
            words.update(_TRAIN_WORD.findall(_normalize(text, True, False, True)))
        chars = Counter()
        for word, count in words.items():
            for ch in word:
                chars[ch] += count
        ranked = sorted(chars, key=lambda ch: (-chars[ch], ch))
        kept, covered, total = [], 0, sum(chars.values())
        for ch in ranked[:vocab_size - fixed]:  # characters that do not fit are left to byte fallback
            if covered >= CHARACTER_COVERAGE * total:
                break
            kept.append(ch)
            covered += chars[ch]
        blocked = set(ranked[len(kept):]) | {ch for ch in chars if ch.isdigit()}  # digits stay single
        reserved = set(cls.SPECIALS) | {"<0x%02X>" % b for b in range(256)}
        merges = [a + b for a, b in learn_merges(words, vocab_size - fixed - len(kept), blocked, reserved)]
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
        """The same layout and settings as `train`, learned by the sentencepiece library (C++ and
        multi-threaded: for corpora too big for the readable trainer above)."""
        tok = cls.from_bytes(train_with_sentencepiece(texts, vocab_size, cls.CHAT_TOKENS), "sentencepiece's output")
        if [tok.id_to_piece(i) for i in range(len(cls.SPECIALS))] != list(cls.SPECIALS):
            raise ValueError("the sentencepiece trainer did not put the special tokens first")
        return tok


def learn_merges(word_counts, max_merges, blocked=(), reserved=()):
    """Classic BPE over unique words {word: count}: repeatedly merge the most frequent adjacent pair
    (ties: smallest pair), updating pair counts only for the words that contain it. -> the merged
    pairs in order. Symbols in `blocked` never merge; no merge may spell a piece in `reserved`.
    (bpe.py's byte-level trainer learns its merges here too.)"""
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
        merges.append(pair)
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


if __name__ == "__main__":  # python -m nanosft.tokenizer train|encode|decode|inspect: the command line is cli.py
    from nanosft.cli import tokenizer_main
    tokenizer_main()
