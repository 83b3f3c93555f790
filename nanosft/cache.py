"""
A run's data, tokenized once: the data files and the tokenizer, kept in `--cache-dir` (data/cache/)
by content.

    data = load_data(args, run_dir, rank, world)        all of it, as train.py uses it
    files = [DataFile(path, args) for path in ...]     a file, read and validated only if needed
    tok = tokenizer_for(args, files, run_dir)           loaded, or trained (and cached)
    samples, counts = files[0].samples(tok, template, row_len)     rendered (data.py), or cached

Every cached result is named by a hash of everything it depends on: the data file's bytes, the
tokenizer's bytes and the settings. A rerun on the same data only hashes the file and skips
parsing, validating and tokenizing it; any change to the file or the tokenizer misses the cache.
Samples are stored as flat numpy arrays, which np.load reads back with allow_pickle=False.
train.py is the only user; data.py does the work this file saves.
"""

import hashlib
import json
import os
import time
import zipfile
from types import SimpleNamespace

import numpy as np
import torch

from nanosft.data import (Blend, error_list, load_conversations, load_documents, load_pairs, pack, parse_source,
                          render_conversations, render_documents, render_pairs, render_prompts, shard, split_off)
from nanosft.distributed import is_rank0, print0
from nanosft.evaluate import load_held_out
from nanosft.files import atomic_write
from nanosft.preference import STAGES as PAIR_STAGES
from nanosft.rlhf import STAGES as RL_STAGES
from nanosft.bpe import ByteLevelBPE
from nanosft.template import ChatTemplate, with_markers
from nanosft.tokenizer import Tokenizer
from nanosft.tokenizer_dir import load_tokenizer

CACHE_VERSION = 1  # bump when rendering or tokenizing changes what a cached file would hold


def file_digest(path):
    """sha256 of a file's bytes: the cache's notion of "the same data"."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_path(cache_dir, kind, *parts, ext=".npz"):
    """cache_dir/kind-<hash of everything the cached result depends on>.npz"""
    key = hashlib.sha256(json.dumps([CACHE_VERSION, *parts]).encode()).hexdigest()[:32]
    return os.path.join(cache_dir, f"{kind}-{key}{ext}")


def save_samples(path, samples, meta):
    """Samples as three flat numpy arrays (ids, mask, offsets) and a JSON string."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lengths = [len(ids) for ids, _ in samples]
    arrays = {"ids": np.concatenate([ids for ids, _ in samples] or [np.zeros(0, np.int32)]),
              "mask": np.concatenate([m for _, m in samples] or [np.zeros(0, np.int8)]),
              "offsets": np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]),
              "meta": np.array(json.dumps(meta))}
    with atomic_write(path, "wb", shared=True) as f:  # (runs may share a cache folder)
        np.savez(f, **arrays)


def load_samples(path):
    """-> (samples, meta), or None when the file cannot be read back (then it is recomputed)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            ids, mask, offsets, meta = z["ids"], z["mask"], z["offsets"], json.loads(str(z["meta"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    return [(ids[a:b], mask[a:b]) for a, b in zip(offsets[:-1], offsets[1:])], meta


class DataFile:
    """A training or validation file: read and validated at most once, and only if needed (with
    the tokenizer and the token ids in the cache it is not), rendered through the cache."""

    def __init__(self, path, args):
        self.path, self.args = path, args
        self.digest = file_digest(path)
        self._records, self.skipped = None, 0

    def records(self):
        """The validated conversations (or documents); invalid ones stop the run, or with
        --skip-invalid are listed and counted. The same validation as `python -m nanosft.data check`."""
        if self._records is None:
            if self.args.stage == "pretrain":
                self._records, errors = load_documents(self.path, self.args.skip_invalid)
            elif self.args.stage in PAIR_STAGES:
                self._records, errors = load_pairs(self.path, self.args.format, self.args.skip_invalid)
            else:
                self._records, errors = load_conversations(self.path, self.args.format, self.args.skip_invalid)
            self.skipped = len(errors)
            if errors:
                print0(f"{self.path}: {len(errors)} invalid record(s) left out (--skip-invalid):\n"
                       + error_list(self.path, errors))
        return self._records

    def samples(self, tok, template, row_len):
        """-> (samples, counts) as data.render_conversations gives them, from the cache when this
        file was rendered before with the same tokenizer and settings."""
        a = self.args
        cached = a.cache_dir and a.stage not in RL_STAGES and cache_path(a.cache_dir, "samples", self.digest, hashlib.sha256(tok.to_bytes()).hexdigest(),
                                            template.signature, row_len, a.train_on, a.format, a.skip_invalid, a.stage)
        hit = load_samples(cached) if cached and os.path.exists(cached) else None  # (unreadable: a miss)
        pairs = a.stage in PAIR_STAGES  # cached as their rows, chosen and rejected in turn
        if hit:
            samples, meta = hit
            samples = list(zip(samples[0::2], samples[1::2])) if pairs else samples
            self.skipped = meta["skipped"]
            print0(f"{self.path}: tokenized conversations from the cache ({cached})"
                   + (f"; {self.skipped} invalid record(s) left out" if self.skipped else ""))
            return samples, meta["counts"]
        if a.stage == "pretrain":  # documents are cut into pieces: nothing truncated or left out
            samples, counts = render_documents(self.records(), template, row_len), {"truncated": 0, "dropped": 0}
        elif a.stage in PAIR_STAGES:  # ((ids, mask) with the chosen reply, the same with the rejected one)
            samples, counts = render_pairs(self.records(), template, row_len)
        elif a.stage in RL_STAGES:  # (prompt ids, the known answer): rlhf.py's rollouts write the replies
            samples, counts = render_prompts(self.records(), template, row_len)
        else:
            samples, counts = render_conversations(self.records(), template, row_len, a.train_on)
        if cached and is_rank0():
            save_samples(cached, [side for pair in samples for side in pair] if pairs else samples,
                         {"counts": counts, "skipped": self.skipped})
        return samples, counts


def tokenizer_for(args, files, run_dir):
    """The run's tokenizer: the one a resumed run started with, --tokenizer's, or one trained on
    the data files (deterministic: the same data and settings give the same tokenizer, on every
    rank, every time; so it is cached like the samples)."""
    if args.resume:
        return load_tokenizer(run_dir)
    if args.tokenizer:  # a .model or tokenizer.json file, or a directory holding one
        return load_tokenizer(args.tokenizer)
    byte_level = args.tokenizer_kind == "bytelevel"
    cached = args.cache_dir and cache_path(args.cache_dir, "tokenizer", [f.digest for f in files], args.vocab_size,
                                           args.tokenizer_trainer, args.format, args.skip_invalid, args.stage,
                                           *(["bytelevel"] if byte_level else []), ext=".json" if byte_level else ".model")
    if cached and os.path.exists(cached):
        try:
            return load_tokenizer(cached)
        except ValueError:  # a damaged cache file: learn the tokenizer again, as for the samples
            pass
    texts = [t for f in files for r in f.records() for t in ([r["text"]] if "text" in r else
                                                              [m["content"] for m in r["messages"]])]
    if byte_level:
        tok = ByteLevelBPE.train(texts, args.vocab_size, Tokenizer.CHAT_TOKENS)
    else:
        tok = (Tokenizer.train_spm if args.tokenizer_trainer == "spm" else Tokenizer.train)(texts, args.vocab_size)
    if cached and is_rank0():
        os.makedirs(args.cache_dir, exist_ok=True)
        with atomic_write(cached, "wb", shared=True) as f:
            f.write(tok.to_bytes())
    return tok


def training_samples(files, weights, tok, template, row_len, args):
    """-> (training samples, or a Blend of several files' samples; held-out validation samples;
    the files' truncation counts, summed). Every file is rendered through the cache, and a
    --val-split share of each is held out before blending. Preference pairs are not blended: the
    files' pairs follow one another."""
    sources, held_out, counts = [], [], {"truncated": 0, "dropped": 0}
    for f in files:
        samples, c = f.samples(tok, template, row_len)
        counts = {k: counts[k] + c[k] for k in counts}
        samples, held = split_off(samples, args.val_split, args.seed) if args.val_split else (samples, [])
        held_out += held
        if not samples:
            why = [f"{f.skipped} invalid, left out" if f.skipped else "",
                   f"{c['dropped']} longer than --max-seq-len {args.max_seq_len}" if c["dropped"] else "",
                   f"{len(held)} held out by --val-split {args.val_split}" if held else ""]
            raise SystemExit(f"{f.path}: nothing to train on ({', '.join(w for w in why if w) or 'the file is empty'})")
        sources.append(samples)
    if len(sources) == 1 or args.stage in PAIR_STAGES + RL_STAGES:
        return [s for source in sources for s in source], held_out, counts
    return Blend(sources, weights), held_out, counts


def fit_note(counts, max_seq_len):
    """What fitting conversations into rows cost, for the data line of the log ('' when nothing)."""
    notes = [f"{counts['truncated']} lost their oldest exchanges to fit --max-seq-len {max_seq_len}"
             if counts["truncated"] else "",
             f"{counts['dropped']} left out (their last exchange alone is longer)" if counts["dropped"] else ""]
    return "".join(f"; {n}" for n in notes if n)


def load_data(args, run_dir, rank, world, tok=None):
    """train.py's data: validate, tokenize and render the files (or find it all in the cache),
    blend them, pack this rank's validation rows, read the held-out prompts. tok: the --init-from
    model's tokenizer (else tokenizer_for's); it gains the markers of --chat-format where it lacks
    them. -> a namespace of what the run uses."""
    t0 = time.time()
    if rank != 0 and args.cache_dir:
        torch.distributed.barrier()  # rank 0 first: it fills the cache, the others then read the same rows
    sources = [parse_source(spec) for spec in args.data]
    files = [DataFile(path, args) for path, _ in sources]
    if args.resume or tok is None:
        tok = tokenizer_for(args, files, run_dir)
    chat_format = None if args.chat_format == "auto" else args.chat_format  # auto: the tokenizer's own
    tok = with_markers(tok, chat_format)
    template = ChatTemplate(tok, chat_format, date=getattr(args, "chat_date", None))
    tok.chat_template = template.jinja  # saved with the run: chat.py renders prompts in the same format
    args.chat_date = template.date  # (Llama 3.1+'s date, in args.json: a resumed run renders as it started)
    # +1: inputs and targets are the row shifted by one; a reward model reads its rows whole; the RL
    # stages' prompts leave room for the replies their rollouts write
    row_len = args.max_seq_len - args.max_new_tokens if args.stage in RL_STAGES else args.max_seq_len + (args.stage != "reward")
    samples, val_samples, counts = training_samples(files, [w for _, w in sources], tok, template, row_len, args)
    mix = (" blended " + ", ".join(f"{f.path} x{n}" for f, n in zip(files, samples.counts))
           if isinstance(samples, Blend) else f" from {files[0].path}")
    unit = {"pretrain": "pieces of text", "sft": "conversations", "ppo": "prompts", "grpo": "prompts"}.get(
        args.stage, "preference pairs")
    print0(f"data: {len(samples)} {unit} per epoch{mix}, vocab {tok.vocab_size}" + fit_note(counts, args.max_seq_len)
           + (f"; {len(val_samples)} held out for validation" if val_samples else "") + f" ({time.time() - t0:.1f}s)")
    if args.val_data:
        more, val_counts = DataFile(args.val_data, args).samples(tok, template, row_len)
        print0(f"validation: {len(more)} {unit} from {args.val_data}" + fit_note(val_counts, args.max_seq_len))
        val_samples += more
    sft_samples = []
    if getattr(args, "sft_data", ""):  # --stage dpo's SFT term: conversations, rendered as SFT renders them
        as_sft = SimpleNamespace(**{**vars(args), "stage": "sft", "format": "auto"})
        sft_samples, sft_counts = DataFile(args.sft_data, as_sft).samples(tok, template, args.max_seq_len + 1)
        if not sft_samples:
            raise ValueError(f"{args.sft_data}: no conversation to mix in (--sft-data; "
                             f"{sft_counts['dropped']} longer than --max-seq-len {args.max_seq_len})")
        print0(f"SFT data mixed in: {len(sft_samples)} conversations from {args.sft_data}"
               + fit_note(sft_counts, args.max_seq_len))
    if rank == 0 and args.cache_dir:
        torch.distributed.barrier()
    pairs = args.stage in PAIR_STAGES  # (every rank scores its share of the held-out pairs: preference.py)
    val = shard(pack(val_samples, row_len, template.pad), rank, world, template.pad) if val_samples and not pairs else None
    return SimpleNamespace(tok=tok, template=template, files=files, samples=samples, counts=counts, row_len=row_len,
                           val=val, val_pairs=val_samples if pairs else [], sft_samples=sft_samples,
                           evals=load_held_out(args.eval_data) if args.eval_data else [])
