"""
The safetensors file format, read and written by hand (no pickle, so opening a file never runs code).

    8 bytes     header length N, little-endian unsigned
    N bytes     UTF-8 JSON: {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
                             optional "__metadata__": {str: str}}, padded with spaces
    the rest    raw little-endian tensor bytes; offsets count from the start of this section

checkpoint.py and export.py use it to read Hugging Face checkpoints (one file or an index plus shards,
see load_sharded) and to write run directories and exports that Hugging Face tools can open.
"""

import json
import math
import os
import struct
from collections import Counter

import torch

from nanosft.files import atomic_write

# file dtype -> torch dtype, in the order the reference writer lays data out: widest elements first,
# so with a header padded to 8 bytes every tensor starts at a multiple of its element size
DTYPES = {"I64": torch.int64, "F64": torch.float64, "F32": torch.float32, "I32": torch.int32,
          "BF16": torch.bfloat16, "F16": torch.float16, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100_000_000  # the reference's limit; a bigger "header" is a corrupt length field


class SafetensorsError(ValueError):
    """A malformed file; the message starts with the file's path."""


def _no_duplicates(pairs):
    counts = Counter(k for k, _ in pairs)
    if len(counts) != len(pairs):  # json.loads would silently keep the last one
        raise ValueError(f"duplicate key {next(k for k, c in counts.items() if c > 1)!r}")
    return dict(pairs)


def _read_header(f, path):
    """-> ({name: (dtype, shape, begin, end)} in file order, metadata, start of data), all checked."""
    def fail(why):
        return SafetensorsError(f"{path}: {why}")

    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise fail(f"file is {size} bytes, shorter than the 8-byte header length")
    n = struct.unpack("<Q", f.read(8))[0]
    if n > MAX_HEADER:
        raise fail(f"header length {n} is over the {MAX_HEADER // 1_000_000} MB limit")
    if 8 + n > size:
        raise fail(f"header length {n} is beyond the file ({size} bytes)")
    try:
        header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise fail(f"header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise fail("header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise fail("__metadata__ is not an object of strings")
    data_size = size - 8 - n
    entries = {}
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise fail(f"entry {name!r} is not an object with exactly dtype, shape and data_offsets")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if dtype not in DTYPES:
            raise fail(f"entry {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise fail(f"entry {name!r} has shape {shape!r}, not a list of non-negative ints")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            raise fail(f"entry {name!r} has data_offsets {offsets!r}, not 0 <= begin <= end <= {data_size}")
        begin, end = offsets
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected:
            raise fail(f"entry {name!r} has {end - begin} bytes but {dtype} {shape} needs {expected}")
        entries[name] = (DTYPES[dtype], shape, begin, end)
    # the ranges must tile the data section exactly, as the reference reader demands: an overlap
    # would alias two tensors, a gap or tail would be bytes that belong to nothing
    pos = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if begin < pos:
            raise fail(f"entry {name!r} overlaps the tensor before it (bytes {begin}..{pos})")
        if begin > pos:
            raise fail(f"data is not contiguous: bytes {pos}..{begin} belong to no tensor")
        pos = end
    if pos != data_size:
        raise fail(f"data is not contiguous: bytes {pos}..{data_size} belong to no tensor")
    return entries, metadata, 8 + n


def load_file(path) -> dict[str, torch.Tensor]:
    """All tensors of one file, in file order, on the CPU."""
    out = {}
    with open(path, "rb") as f:
        entries, _, start = _read_header(f, path)
        for name, (dtype, shape, begin, end) in entries.items():
            if begin == end:  # torch.frombuffer refuses an empty buffer
                out[name] = torch.empty(shape, dtype=dtype)
                continue
            # one buffer per tensor, owned by the tensor: a multi-GB checkpoint is never held twice.
            # frombuffer reads native byte order, which is little-endian on every machine torch targets.
            buf = bytearray(end - begin)
            f.seek(start + begin)
            if f.readinto(buf) != len(buf):
                raise SafetensorsError(f"{path}: file ended inside tensor {name!r}")
            out[name] = torch.frombuffer(buf, dtype=dtype).reshape(shape)
    return out


def load_metadata(path) -> dict[str, str]:
    """The file's "__metadata__" (an empty dict if it has none), without reading any tensor."""
    with open(path, "rb") as f:
        return _read_header(f, path)[1]


def _check_no_shared_memory(tensors):
    """Tied weights saved under two names would be written twice and load back untied."""
    spans = []  # (device, first byte, last byte + 1, name) of each tensor's memory
    for name, t in tensors.items():
        if t.numel():
            extent = 1 + sum((d - 1) * s for d, s in zip(t.shape, t.stride()))
            spans.append((str(t.device), t.data_ptr(), t.data_ptr() + extent * t.element_size(), name))
    spans.sort()
    for (dev_a, _, end_a, a), (dev_b, begin_b, _, b) in zip(spans, spans[1:]):
        if dev_a == dev_b and begin_b < end_a:
            raise ValueError(f"tensors {a!r} and {b!r} share memory (tied weights?): save only one of them, "
                             "e.g. drop lm_head.weight when it is tied to the embeddings")


def save_file(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors (any device, any strides) and optional string metadata, as the reference writes them."""
    for name, t in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"tensor name {name!r} must be a string other than '__metadata__'")
        if t.dtype not in NAMES:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}; supported: {', '.join(DTYPES)}")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("metadata must map strings to strings")
    _check_no_shared_memory(tensors)
    rank = {name: i for i, name in enumerate(DTYPES)}
    order = sorted(tensors, key=lambda k: (rank[NAMES[tensors[k].dtype]], k))
    header = {} if metadata is None else {"__metadata__": metadata}
    pos = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keeps the data section, and so every tensor, aligned
    with atomic_write(path, "wb") as f:  # never a half-written file under the real name
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in order:  # one tensor at a time, so the whole model is never copied at once
            f.write(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def load_sharded(directory) -> dict[str, torch.Tensor]:
    """A Hugging Face checkpoint directory: model.safetensors, or model.safetensors.index.json
    ({"weight_map": {name: shard file}}) and the shards it names, which must agree with it exactly.
    With both, model.safetensors wins, as in transformers."""
    index, single = (os.path.join(directory, n) for n in ("model.safetensors.index.json", "model.safetensors"))
    if os.path.exists(single):
        return load_file(single)
    if not os.path.exists(index):
        raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f, object_pairs_hook=_no_duplicates)["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise SafetensorsError(f"{index}: not an index with a weight_map ({e!r})") from None
    if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
        raise SafetensorsError(f"{index}: weight_map is not an object of names to file names")
    out = {}
    for shard in dict.fromkeys(weight_map.values()):  # each shard once, in index order
        path = os.path.join(directory, shard)
        if os.path.basename(shard) != shard or not os.path.exists(path):
            raise SafetensorsError(f"{index}: shard {shard!r} not found in {directory}")
        tensors = load_file(path)
        missing = [n for n, s in weight_map.items() if s == shard and n not in tensors]
        if missing:
            raise SafetensorsError(f"{index}: {missing[0]!r} is listed in {shard} but that file does not have it")
        for name in tensors:
            if weight_map.get(name) != shard:
                where = f"lists it in {weight_map[name]}" if name in weight_map else "does not list it"
                raise SafetensorsError(f"{index}: {shard} has {name!r} but the index {where}")
        out.update(tensors)
    return out
