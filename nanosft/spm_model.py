"""
SentencePiece's `.model` file, read and written by hand: the format, not the algorithm (that is
tokenizer.py). A first read of the project can skip this file.

A `.model` file is one protobuf message, ModelProto (sentencepiece_model.proto):

    repeated SentencePiece pieces = 1;    each {piece: string = 1, score: float = 2, type: Type = 3}
    TrainerSpec trainer_spec = 2;         model type, vocab size, byte_fallback, special pieces ...
    NormalizerSpec normalizer_spec = 3;   how text is normalised before it is split into pieces

read_model turns the bytes into plain Python values, write_model back into bytes. Only the fields
tokenizer.py needs are decoded (the schemas below); every other field is kept as a raw (number,
wire type, value) triple and written back unchanged, so a loaded model saves back byte for byte.
train_with_sentencepiece has the sentencepiece library itself write such a file.
"""

import io
import struct

# Piece types of sentencepiece_model.proto (ModelProto.SentencePiece.Type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE = 2  # TrainerSpec.ModelType; the proto default (1) is UNIGRAM

# Each schema maps a field name to (field number, kind, proto default).
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


def option(trainer, normalizer, name):
    """A TrainerSpec or NormalizerSpec setting: the value the file sets, else the proto default."""
    for spec, schema in ((trainer, TRAINER_FIELDS), (normalizer, NORMALIZER_FIELDS)):
        if name in schema:
            return spec.get(name, schema[name][2])
    raise KeyError(name)


def read_model(data):
    """The bytes of a .model file -> (pieces [(piece, score, type)], trainer {name: value},
    normalizer {name: value}, unknown {"model"|"trainer"|"normalizer": raw fields}). Only the
    fields the file sets are in trainer and normalizer. Raises ValueError on malformed bytes."""
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
    return pieces, trainer, normalizer, unknown


def write_model(pieces, trainer, normalizer, unknown=None):
    """The inverse of read_model. sentencepiece writes a piece's type only when it is not NORMAL;
    so do we, so that a loaded model saves back byte for byte."""
    unknown = unknown or {}
    fields = [(1, 2, _serialize({"piece": p, "score": s, **({"type": t} if t != NORMAL else {})}, [], PIECE_FIELDS))
              for p, s, t in pieces]
    fields.append((2, 2, _serialize(trainer, unknown.get("trainer", []), TRAINER_FIELDS)))
    fields.append((3, 2, _serialize(normalizer, unknown.get("normalizer", []), NORMALIZER_FIELDS)))
    return _serialize({}, fields + unknown.get("model", []), {})


def train_with_sentencepiece(texts, vocab_size, control_symbols):
    """The bytes of a .model file that the sentencepiece library trains on `texts` (its lines), laid
    out as tokenizer.py's own trainer lays a vocabulary out: <unk>, <s>, </s>, <pad>, the control
    symbols, 256 byte pieces, then BPE pieces; identity normalisation, digits split."""
    import sentencepiece  # only needed here

    lines = (line for text in texts for line in text.split("\n") if line.strip())
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=lines, model_writer=model, model_type="bpe", vocab_size=vocab_size,
            normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
            byte_fallback=True, split_digits=True, character_coverage=0.9995, hard_vocab_limit=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, control_symbols=list(control_symbols), minloglevel=2)
    except RuntimeError as e:  # e.g. a vocabulary smaller than its special and byte pieces
        raise ValueError(f"the sentencepiece trainer refused vocabulary size {vocab_size}: {e}") from None
    return model.getvalue()


# ----------------------------------------------------------------------------
# Protobuf wire format: a message is a sequence of (key, value); key = field number << 3 | wire
# type; wire type 0 is a varint, 2 a length-prefixed byte string, 5 four bytes, 1 eight bytes.

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
