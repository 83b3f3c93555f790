"""
Supervised fine-tuning, through DeepSpeed. One process on a laptop CPU by default:

    python train.py                                   # the default run on data/train.jsonl
    deepspeed --num_gpus 2 train.py --zero-stage 2    # the same script on 2 GPUs (or 2 CPU ranks)
    python train.py --out runs/x --save-every 200     # checkpoints to resume from ...
    python train.py --out runs/x --resume             # ... after a crash or a kill

The story: read and validate the chat data -> train (or load) the tokenizer -> render and pack the
conversations -> build the model -> deepspeed.initialize (ZeRO stage, offload, bf16/fp16, gradient
clipping: configs/ds_config.json or --ds-config, with the flags written over it) -> train with the
masked SFT loss, normalised by the supervised tokens of the whole global batch -> evaluate
(validation loss, held-out exact match) -> save the run directory (see nanosft/checkpoint.py).
The DeepSpeed plumbing (config, optimizer, checkpoints, memory report) is in nanosft/distributed.py.
"""

import argparse
import csv
import hashlib
import faulthandler
import importlib.util
import io
import math
import os
import random
import shutil
import time

import deepspeed
import numpy as np
import torch

from nanosft.attention import ATTEND, VARIANTS
from nanosft.checkpoint import load_model, point_latest, read_json, save_model, write_json
from nanosft.data import (Batches, Blend, cache_path, error_list, file_digest, load_conversations, load_documents,
                          load_samples, pack, parse_source, save_samples, shard, split_off, tokenize,
                          tokenize_text)
from nanosft.formats import FORMATS
from nanosft.distributed import (all_sum, config_settings, current_loss_scale, deepspeed_config, estimate_memory,
                                 full_state_dict, is_rank0, load_checkpoint, make_optimizer, measure_memory,
                                 pick_dtype, print0, rng_state, save_checkpoint, set_rng_state, setup_distributed,
                                 write_text_atomic)
from nanosft.evaluate import (format_samples, generation_metrics, load_held_out, loss_and_ppl, pick_samples, table,
                              validation_loss)
from nanosft.model import ModelConfig, Transformer
from nanosft.plot import MONITOR_DIR, plot_run
from nanosft.progress import Progress, clock
from nanosft.template import TRAIN_ON, ChatTemplate
from nanosft.tokenizer import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))

# Settings a DeepSpeed config can also make. Precedence: the flag, else --ds-config, else these.
CONFIG_DEFAULTS = {"batch_size": 16, "grad_accum": 1, "zero_stage": 0, "offload": "none", "dtype": "auto",
                   "grad_clip": 1.0}
# Flags that may change when a run is resumed; any other must stay as the run started.
RESUME_MAY_CHANGE = {"resume", "out", "local_rank", "log_every", "save_every", "keep_checkpoints", "cache_dir",
                     "quiet", "tensorboard", "eval_every", "compile"}
PATH_FLAGS = {"val_data", "eval_data", "init_from", "tokenizer", "ds_config"}


def build_parser():
    p = argparse.ArgumentParser(description="supervised fine-tuning of a chat model with DeepSpeed")
    # data
    p.add_argument("--data", nargs="+", default=[os.path.join(HERE, "data/train.jsonl")], metavar="FILE[:WEIGHT]",
                   help="training data; several files are blended by weight (a.jsonl:0.7 b.json:0.3)")
    p.add_argument("--val-split", type=float, default=0.0,
                   help="hold out this fraction of each training file for validation (with or instead of --val-data)")
    p.add_argument("--val-data", default=None, help="validation data ('' for none; default data/val.jsonl, "
                   "none with --stage pretrain)")
    p.add_argument("--eval-data", default=None, help="held-out prompts with answers for exact match ('' for none; "
                   "default data/eval.jsonl, none with --stage pretrain)")
    p.add_argument("--stage", default="sft", choices=["sft", "pretrain"],
                   help="pretrain: plain text (.txt/.md files, or JSONL of {\"text\"}), loss on every token")
    p.add_argument("--format", default="auto", choices=("auto",) + FORMATS,
                   help="data format (auto: recognised per record by its keys; see nanosft/formats.py)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="leave out invalid records (reported and counted) instead of stopping")
    p.add_argument("--train-on", default="all-assistant", choices=TRAIN_ON,
                   help="which assistant turns the loss covers; system and user turns never")
    p.add_argument("--packing", default="on", choices=["on", "off"],
                   help="on: several conversations share a row (document mask); off: a row each, grouped by length")
    p.add_argument("--cache-dir", default=os.path.join(HERE, "data", "cache"),
                   help="tokenized data and trained tokenizers, keyed by content hashes ('' for none)")
    p.add_argument("--max-seq-len", type=int, default=256, help="tokens per packed row (the context length); "
                   "longer conversations lose their oldest whole exchanges")
    p.add_argument("--init-from", default="", help="start from this run or Hugging Face Llama-family directory "
                   "(its model shape and tokenizer replace the model and tokenizer flags)")
    p.add_argument("--tokenizer", default="", help="a .model file (or a run directory) to use instead of training one")
    p.add_argument("--vocab-size", type=int, default=1024, help="vocabulary of the tokenizer trained on --data")
    p.add_argument("--tokenizer-trainer", default="nanosft", choices=["nanosft", "spm"],
                   help="train the tokenizer by hand (readable) or with the sentencepiece library (large corpora)")
    # model
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-kv-head", type=int, default=2, help="key/value heads (grouped-query attention)")
    p.add_argument("--attn", default=None, choices=sorted(VARIANTS),
                   help="an attention variant from nanosft/attention.py's VARIANTS (its fields win over the flags)")
    p.add_argument("--attn-impl", default="sdpa", choices=sorted(ATTEND),
                   help="how attention is computed: sdpa (fused) or manual (the explicit math), see attention.py")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each decoder block in the backward pass instead of storing its activations")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (DeepSpeed's engine.compile): faster steps after a compilation "
                        "at the start (about 20 s for the default model on 2 CPU cores)")
    # optimization
    p.add_argument("--batch-size", type=int, default=None, help="packed rows per micro-batch per rank (default 16)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm (default 1.0; 0: off)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (0: use --epochs)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data when --steps is 0")
    # deepspeed
    p.add_argument("--ds-config", default=os.path.join(HERE, "configs/ds_config.json"),
                   help="DeepSpeed JSON to start from; the flags below win over it")
    p.add_argument("--zero-stage", type=int, default=None, choices=[0, 1, 2, 3], help="ZeRO stage (default 0)")
    p.add_argument("--offload", default=None, choices=["none", "optimizer", "all"],
                   help="ZeRO-Offload: optimizer state (stage >= 1) and, with 'all', parameters (stage 3) in CPU memory")
    p.add_argument("--dtype", default=None, choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 where supported, else fp16 on GPU (dynamic loss scaling) or fp32 on CPU")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    # run
    p.add_argument("--out", default="", help="run directory (default runs/<timestamp>)")
    p.add_argument("--save-every", type=int, default=0, help="write a DeepSpeed checkpoint every N steps (0: never)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="how many of the latest checkpoints to keep")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--eval-every", type=int, default=200, help="validation loss every N steps (0: only at "
                   "epoch ends); generation metrics run at step 0, at each epoch's end and at the end")
    p.add_argument("--log-every", type=int, default=25, help="with --quiet or no terminal: a line every N steps")
    p.add_argument("--quiet", action="store_true", help="no live progress bar: a plain line every --log-every steps")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard logs to <out>/tensorboard (DeepSpeed's monitor; pip install tensorboard)")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.resume:
        args = resumed_args(args, given_flags(argv))
    if not os.path.isfile(args.ds_config):
        p.error(f"--ds-config {args.ds_config}: no such file")
    try:
        ds_base = read_json(args.ds_config)
    except ValueError as e:
        p.error(str(e))
    if not isinstance(ds_base, dict):
        p.error(f"{args.ds_config}: expected a JSON object (a DeepSpeed config), got {type(ds_base).__name__}")
    from_config = config_settings(ds_base)
    for k, default in CONFIG_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, from_config[k] if from_config[k] is not None else default)
    args.ds_base = ds_base
    for k, default in (("val_data", "data/val.jsonl"), ("eval_data", "data/eval.jsonl")):
        if getattr(args, k) is None:  # the built-in chat data's, which a pretraining run has no use for
            setattr(args, k, "" if args.stage == "pretrain" else os.path.join(HERE, default))
    check_args(p, args)
    return args


def given_flags(argv=None):
    """Names of the flags given on the command line (not left at their defaults)."""
    p, unset = build_parser(), object()  # not a string: argparse would run a string default through `type`
    p.set_defaults(**{a.dest: unset for a in p._actions})
    return {k for k, v in vars(p.parse_args(argv)).items() if v is not unset}


def resumed_args(args, given):
    """A resumed run takes its settings from the run's args.json; flags given again must agree."""
    if not args.out:
        raise SystemExit("error: --resume needs the --out of the run to continue")
    path = os.path.join(args.out, "args.json")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} not found: {args.out} is not a run started by train.py")
    try:
        recorded = read_json(path)
    except ValueError:  # invalid JSON or UTF-8
        recorded = None
    if not isinstance(recorded, dict):
        raise SystemExit(f"error: {path} is not the JSON object train.py writes; the run cannot be resumed from it")
    saved = {**vars(build_parser().parse_args([])), **recorded}  # a setting it lacks takes its default
    if isinstance(saved["data"], str):
        saved["data"] = [saved["data"]]  # one path, not a list

    def same(k):
        a, b = getattr(args, k), saved[k]
        if k == "data":
            return [os.path.abspath(x) for x in a] == [os.path.abspath(x) for x in b]
        return os.path.abspath(a) == os.path.abspath(b) if k in PATH_FLAGS and a and b else a == b
    changed = [k for k in given - RESUME_MAY_CHANGE if k in saved and not same(k)]
    if changed:
        raise SystemExit("error: --resume continues the run as it started; these flags differ from "
                         f"{path}: " + ", ".join(f"--{k.replace('_', '-')} {saved[k]!r} (given {getattr(args, k)!r})"
                                                  for k in sorted(changed)))
    for k in given & RESUME_MAY_CHANGE:
        saved[k] = getattr(args, k)
    saved["resume"] = True
    return argparse.Namespace(**saved)


def check_args(p, args):
    if min(args.batch_size, args.grad_accum, args.max_seq_len, args.n_layer, args.n_head, args.dim) < 1 or args.steps < 0:
        p.error("--batch-size, --grad-accum, --max-seq-len, --n-layer, --n-head and --dim must be at least 1, "
                "--steps not negative")
    if args.n_kv_head < 0 or args.warmup_steps < 0 or args.seed < 0 or not 0 <= (args.grad_clip or 0) < math.inf:
        p.error("--n-kv-head (0: as many as --n-head), --warmup-steps, --seed and --grad-clip must not be negative "
                "(nor nan or inf)")
    if not args.steps and not 0 < args.epochs < float("inf"):
        p.error("--epochs must be a positive number (or give --steps)")
    variant = VARIANTS.get(args.attn, {})  # its fields win over the flags
    rope = variant.get("pos_emb", "rope") == "rope"
    if args.dim % args.n_head or (rope and (args.dim // args.n_head) % 2):
        p.error(f"--dim {args.dim} must split into --n-head {args.n_head} heads"
                + (" of an even size (RoPE rotates pairs)" if rope else ""))
    n_kv_head = variant.get("n_kv_head", args.n_kv_head) or args.n_head
    if args.n_head % n_kv_head:
        p.error(f"--n-head {args.n_head} must be a multiple of the {n_kv_head} key/value heads"
                + (f" of --attn {args.attn}" if args.attn else " of --n-kv-head"))
    if args.attn and args.init_from:
        p.error("--attn builds a new model; a model from --init-from keeps the attention it was trained with")
    if args.offload == "optimizer" and args.zero_stage == 0:
        p.error("--offload optimizer needs --zero-stage 1, 2 or 3 (ZeRO-Offload moves the partitioned optimizer)")
    if args.offload == "all" and args.zero_stage != 3:
        p.error("--offload all needs --zero-stage 3 (only stage 3 partitions the parameters)")
    if args.dtype == "fp16" and not torch.cuda.is_available():
        p.error("--dtype fp16 needs a GPU (DeepSpeed has no fp16 training on CPU); use bf16 or fp32")
    if not 0 <= args.val_split < 1:
        p.error("--val-split must be in [0, 1)")
    if args.save_every < 0 or args.keep_checkpoints < 1:
        p.error("--save-every must not be negative and --keep-checkpoints at least 1")
    if args.eval_every < 0 or args.log_every < 1:
        p.error("--eval-every must not be negative and --log-every at least 1")
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:  # DeepSpeed's monitor writes through it
        p.error("--tensorboard needs the tensorboard package: pip install tensorboard")


def lr_lambda(warmup, total):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def load_tokenizer(args, files, run_dir):
    if args.resume:  # the tokenizer the run started with, not a retrained one
        return Tokenizer.load(os.path.join(run_dir, "tokenizer.model"))
    if args.tokenizer:  # a .model file, or a run directory holding one
        path = args.tokenizer
        return Tokenizer.load(os.path.join(path, "tokenizer.model") if os.path.isdir(path) else path)
    # deterministic: the same data and settings give the same tokenizer, on every rank, every time
    cached = args.cache_dir and cache_path(args.cache_dir, "tokenizer", [f.digest for f in files], args.vocab_size,
                                           args.tokenizer_trainer, args.format, args.skip_invalid, args.stage,
                                           ext=".model")
    if cached and os.path.exists(cached):
        try:
            return Tokenizer.load(cached)
        except ValueError:  # a damaged cache file: learn the tokenizer again, as for the token ids
            pass
    texts = [t for f in files for r in f.records() for t in ([r["text"]] if "text" in r else
                                                              [m["content"] for m in r["messages"]])]
    train = Tokenizer.train_spm if args.tokenizer_trainer == "spm" else Tokenizer.train
    tok = train(texts, args.vocab_size)
    if cached and is_rank0():
        os.makedirs(args.cache_dir, exist_ok=True)
        tok.save(f"{cached}.{os.getpid()}.tmp")
        os.replace(f"{cached}.{os.getpid()}.tmp", cached)
    return tok


class DataFile:
    """A training or validation file: read and validated at most once, and only if needed (with
    the tokenizer and the token ids in the cache it is not), tokenized through the cache."""

    def __init__(self, path, args):
        self.path, self.args = path, args
        self.digest = file_digest(path)
        self._records, self.skipped = None, 0

    def records(self):
        """The validated conversations; invalid ones stop the run, or with --skip-invalid are
        listed and counted. The same validation as `python -m nanosft.data check`."""
        if self._records is None:
            if self.args.stage == "pretrain":
                self._records, errors = load_documents(self.path, self.args.skip_invalid)
            else:
                self._records, errors = load_conversations(self.path, self.args.format, self.args.skip_invalid)
            self.skipped = len(errors)
            if errors:
                print0(f"{self.path}: {len(errors)} invalid record(s) left out (--skip-invalid):\n"
                       + error_list(self.path, errors))
        return self._records

    def samples(self, tok, template, row_len):
        """-> (samples, counts) as data.tokenize gives them, from the cache when this file was
        tokenized before with the same tokenizer and settings."""
        a = self.args
        cached = a.cache_dir and cache_path(a.cache_dir, "samples", self.digest, hashlib.sha256(tok.to_bytes()).hexdigest(),
                                            row_len, a.train_on, a.format, a.skip_invalid, a.stage)
        hit = load_samples(cached) if cached and os.path.exists(cached) else None  # (unreadable: a miss)
        if hit:
            samples, meta = hit
            self.skipped = meta["skipped"]
            print0(f"{self.path}: tokenized conversations from the cache ({cached})"
                   + (f"; {self.skipped} invalid record(s) left out" if self.skipped else ""))
            return samples, meta["counts"]
        if a.stage == "pretrain":
            samples, counts = tokenize_text(self.records(), template, row_len)
        else:
            samples, counts = tokenize(self.records(), template, row_len, a.train_on)
        if cached and is_rank0():
            save_samples(cached, samples, {"counts": counts, "skipped": self.skipped})
        return samples, counts


def training_samples(files, weights, tok, template, row_len, args):
    """-> (training samples, or a Blend of several files' samples; held-out validation samples;
    the files' truncation counts, summed). Every file is tokenized through the cache, and a
    --val-split share of each is held out before blending."""
    sources, held_out, counts = [], [], {"truncated": 0, "dropped": 0}
    for f in files:
        samples, c = f.samples(tok, template, row_len)
        counts = {k: counts[k] + c[k] for k in counts}
        if args.val_split:
            samples, held = split_off(samples, args.val_split, args.seed)
            held_out += held
        if not samples:
            raise SystemExit(f"{f.path}: no conversation to train on (--max-seq-len {args.max_seq_len}, "
                             f"--val-split {args.val_split})")
        sources.append(samples)
    return (sources[0] if len(sources) == 1 else Blend(sources, weights)), held_out, counts


def fit_note(counts, row_len):
    notes = [f"{counts['truncated']} lost their oldest exchanges to fit --max-seq-len {row_len - 1}"
             if counts["truncated"] else "",
             f"{counts['dropped']} left out (their last exchange alone is longer)" if counts["dropped"] else ""]
    return "".join(f"; {n}" for n in notes if n)


def train_step(engine, micro, world, device, before_step=None):
    """Forward and backward over this rank's micro-batches, then the optimizer step (before which
    `before_step()` is called, if given). Returns the summed NLL, supervised tokens, real tokens
    and token slots computed (real + padding) of the whole global batch.

    NOTE: the loss is normalised by the supervised tokens of the whole global batch (all
    micro-batches, all ranks). DeepSpeed divides each backward by the number of micro-batches and
    averages gradients over the ranks, so multiplying by len(micro) * world undoes both: every
    supervised token weighs the same, however the global batch is split (tests/test_zero.py)."""
    n_sup, n_tok, n_slots = all_sum([sum(b["loss_mask"].sum() for b in micro), sum((b["doc"] >= 0).sum() for b in micro),
                                     sum(b["doc"].numel() for b in micro)], device)
    nll = 0.0
    for i, b in enumerate(micro):
        b = {k: v.to(device) for k, v in b.items()}
        s, _ = engine(b["idx"], pos=b["pos"], doc=b["doc"], targets=b["targets"], loss_mask=b["loss_mask"])
        engine.backward(s * (len(micro) * world) / max(n_sup, 1.0))
        if before_step and i == len(micro) - 1:
            before_step()
        engine.step()  # only the last micro-batch's call steps the optimizer
        nll += s.item()
    return all_sum([nll], device)[0], n_sup, n_tok, n_slots


def record_memory(engine, args, n_params, world, run_dir, show=print0):
    """Measure what each rank holds after the backward pass of a step, with gradients, weights
    and Adam's state all there, and write memory.json: measured bytes per rank next to the ZeRO
    paper's estimate."""
    per_rank = [None] * world
    torch.distributed.all_gather_object(per_rank, measure_memory(engine))
    report = {"zero_stage": args.zero_stage, "offload": args.offload, "dtype": args.dtype, "world_size": world,
              "params": n_params, "per_rank": per_rank,
              "estimate_per_rank": estimate_memory(n_params, args.zero_stage, world, args.dtype)}
    if torch.distributed.get_rank() == 0:
        write_json(os.path.join(run_dir, "memory.json"), report)
        ms = [sum(dev["model_states"] for dev in r.values()) for r in per_rank]
        show(f"memory: model states {max(ms) / 2**20:.2f} MiB per rank (measured; "
               f"ZeRO estimate {report['estimate_per_rank']['model_states'] / 2**20:.2f} MiB), see memory.json")


def trim_monitor(engine, run_dir, upto, samples_per_step):
    """A resumed run recomputes the steps after its checkpoint: cut the monitor's CSVs (and
    TensorBoard's events) back to steps 0..upto (DeepSpeed's own Train/Samples series count
    samples, not steps). Each CSV is replaced atomically, so a kill now cannot lose the rows kept."""
    if not is_rank0():  # the monitor writes on rank 0 only
        return
    def limit(name):  # "Train_Samples_lr" in the CSVs, "Train/Samples/lr" in TensorBoard
        return upto * samples_per_step if name.replace("/", "_").startswith("Train_Samples_") else upto
    folder = os.path.join(run_dir, MONITOR_DIR)
    names = [n for n in os.listdir(folder) if n.endswith(".csv")] if os.path.isdir(folder) else []
    for name in names:
        with open(os.path.join(folder, name), newline="") as f:
            rows = list(csv.reader(f))
        text = io.StringIO()
        csv.writer(text).writerows(rows[:1] + [r for r in rows[1:] if len(r) == 2 and row_step(r) <= limit(name)])
        write_text_atomic(os.path.join(folder, name), text.getvalue())
    # NOTE: DeepSpeed's csv monitor writes a header the first time a process writes to a file, and
    # remembers which in `filenames`; these files have theirs already
    if engine.monitor.csv_monitor is not None:
        engine.monitor.csv_monitor.filenames += [n[:-4] for n in names]
    tb = engine.monitor.tb_monitor  # (a TensorBoard section of --ds-config may log elsewhere: not ours to cut)
    if tb is not None and tb.summary_writer is not None and \
            os.path.abspath(tb.summary_writer.get_logdir()) == os.path.abspath(os.path.join(run_dir, "tensorboard")):
        tb.summary_writer = trim_tensorboard(tb.summary_writer, limit)


def trim_tensorboard(writer, limit):
    """TensorBoard's event files cannot be cut in place: copy the events to keep (step <= limit(tag))
    into a new writer's file, then delete the old files. A kill in between leaves the kept events in
    two files, never in none; the next resume copies each (tag, step) once. -> the new writer."""
    # (as written: the plain loader would turn the scalars into tensors on the way)
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader  # with --tensorboard
    from torch.utils.tensorboard import SummaryWriter
    folder = writer.get_logdir()
    writer.close()
    old = [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.startswith("events.out.tfevents.")]
    writer, copied = SummaryWriter(log_dir=folder), set()
    for path in old:
        for event in LegacyEventFileLoader(path).Load():
            values = event.summary.value  # one scalar per event, as the monitor writes them
            if values and event.step <= limit(values[0].tag) and (values[0].tag, event.step) not in copied:
                copied.add((values[0].tag, event.step))
                writer.file_writer.add_event(event, step=event.step, walltime=event.wall_time)
    writer.flush()
    for name in os.listdir(folder):  # the new file on disk before the old ones go
        if os.path.join(folder, name) not in old:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
    for path in old:
        os.remove(path)
    return writer


def row_step(row):
    """The step (or sample count) of a monitor CSV row; a row cut short by a kill counts as past the end."""
    try:
        return float(row[0])
    except ValueError:
        return math.inf


def log_events(engine, step, group, **values):
    """Write values through DeepSpeed's monitor (rank 0): CSV, and TensorBoard with --tensorboard."""
    if is_rank0():
        engine.monitor.write_events([(f"{group}/{k}", v, step) for k, v in values.items() if v is not None])


def main(args):
    t_start = time.time()
    device, rank, world = setup_distributed()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    run_dir = [args.out or os.path.join(HERE, "runs", time.strftime("%Y%m%d-%H%M%S"))]
    torch.distributed.broadcast_object_list(run_dir, src=0)  # rank 0's clock names it for all
    run_dir = run_dir[0]
    ckpt_dir = os.path.join(run_dir, "checkpoints")

    # ---- data: validate, tokenize, render (or find it all in the cache)
    t_data = time.time()
    if rank != 0 and args.cache_dir:
        torch.distributed.barrier()  # rank 0 first: it fills the cache, the others then read the same rows
    sources = [parse_source(spec) for spec in args.data]
    files = [DataFile(path, args) for path, _ in sources]
    model = None
    if args.init_from:
        model, tok = load_model(args.init_from, attn_impl=args.attn_impl)
        model.train()
    if args.resume or not args.init_from:
        tok = load_tokenizer(args, files, run_dir)
    template = ChatTemplate(tok)
    row_len = args.max_seq_len + 1  # +1: inputs and targets are the row shifted by one
    samples, val_samples, counts = training_samples(files, [w for _, w in sources], tok, template, row_len, args)
    mix = (" blended " + ", ".join(f"{f.path} x{n}" for f, n in zip(files, samples.counts))
           if isinstance(samples, Blend) else f" from {files[0].path}")
    unit = "pieces of text" if args.stage == "pretrain" else "conversations"
    print0(f"data: {len(samples)} {unit} per epoch{mix}, vocab {tok.vocab_size}" + fit_note(counts, row_len)
           + (f"; {len(val_samples)} held out for validation" if val_samples else "") + f" ({time.time() - t_data:.1f}s)")
    if args.val_data:
        more, val_counts = DataFile(args.val_data, args).samples(tok, template, row_len)
        print0(f"validation: {len(more)} conversations from {args.val_data}" + fit_note(val_counts, row_len))
        val_samples += more
    if rank == 0 and args.cache_dir:
        torch.distributed.barrier()
    val = shard(pack(val_samples, row_len, template.pad), rank, world, template.pad) if val_samples else None
    evals = load_held_out(args.eval_data) if args.eval_data else []

    # ---- model and deepspeed
    args.dtype = pick_dtype(args.dtype, device)
    if model is None:
        fields = dict(vocab_size=tok.vocab_size, dim=args.dim, n_layer=args.n_layer, n_head=args.n_head,
                      n_kv_head=args.n_kv_head, max_seq_len=args.max_seq_len, attn_impl=args.attn_impl)
        model = Transformer(ModelConfig(**{**fields, **VARIANTS.get(args.attn, {})}))
    cfg = model.cfg
    if args.max_seq_len > cfg.max_seq_len:
        raise ValueError(f"--max-seq-len {args.max_seq_len} exceeds the model's {cfg.max_seq_len} positions")
    model.grad_checkpointing = args.gradient_checkpointing
    n_params = model.num_params()  # counted now: under ZeRO-3 the module's own tensors become empty shards
    batches = Batches(samples, row_len, template.pad, args.batch_size, args.seed, rank, world, args.packing == "on")
    steps_per_epoch = batches.rows_per_epoch / (args.batch_size * args.grad_accum)
    total_steps = args.steps or max(math.ceil(args.epochs * steps_per_epoch), 1)
    if steps_per_epoch < 1:  # every step then sees some conversations more than once
        print0(f"note: one step takes {1 / steps_per_epoch:.1f} epochs of this data ({batches.rows_per_epoch} rows "
               f"per epoch per rank, {args.batch_size * args.grad_accum} per step): lower --batch-size or --grad-accum")
    optimizer = make_optimizer(model, args.lr, args.weight_decay, args.offload)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup_steps, total_steps))
    ds_cfg = deepspeed_config(args.ds_base, world=world, micro_batch=args.batch_size, grad_accum=args.grad_accum,
                              zero_stage=args.zero_stage, offload=args.offload, dtype=args.dtype,
                              grad_clip=args.grad_clip, pin_memory=device.type == "cuda", log_dir=run_dir,
                              tensorboard=args.tensorboard)
    if rank == 0 and not args.resume:  # a new run in an old run's directory: its logs start afresh
        for folder in (MONITOR_DIR, "tensorboard"):
            shutil.rmtree(os.path.join(run_dir, folder), ignore_errors=True)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    if args.compile:
        # Packed rows all have the same shape, so the training step compiles once (with --packing
        # off, batches are cut to their longest row: a second compilation then covers every length).
        # Evaluation runs eagerly (see evaluate): its batches have other shapes and no backward
        # pass, and would only cost more compilations.
        engine.compile()
    print0(f"model: {n_params:,} parameters, {args.dtype}, ZeRO stage {args.zero_stage}"
           + (f" offload {args.offload}" if args.offload != "none" else "")
           + f", {world} rank(s) on {device.type}; {total_steps} steps of {ds_cfg['train_batch_size']} rows x {row_len} tokens")

    def evaluate(step, generation, state=None):
        """Validation loss (every rank scores its shard) and, if asked, generation metrics: rank 0
        answers the held-out prompts with the fp32 master weights, which is the model a checkpoint
        saves (`state` when the caller has gathered them already). Returns (metrics, replies);
        both are rank 0's business.
        NOTE: meanwhile the other ranks wait at their next collective; with sharded or offloaded
        weights (ZeRO-3, --offload) the copy stays in CPU memory rather than next to the shards."""
        m, replies = {}, None
        if val is not None:
            engine.eval()
            with torch.compiler.set_stance("force_eager"):  # no compilation for these shapes (--compile)
                m["val_loss"], m["val_ppl"] = loss_and_ppl(*all_sum(validation_loss(engine, val, args.batch_size), device))
            engine.train()
        if generation and evals:
            if state is None:
                state = full_state_dict(engine)  # every rank takes part in the gather
            if rank == 0:
                snapshot = Transformer(cfg)
                snapshot.load_state_dict(state)
                on = device if args.zero_stage < 3 and args.offload == "none" else torch.device("cpu")
                scores, replies = generation_metrics(snapshot.to(on).eval(), template, evals)
                m.update(scores)
        log_events(engine, step, "Eval", val_loss=m.get("val_loss"), val_ppl=m.get("val_ppl"),
                   exact_match=m.get("exact_match", {}).get("overall"), bleu=m.get("bleu"))
        return m, replies

    # ---- start, or pick up where a checkpoint left off
    start = {"step": 0, "tokens": 0, "supervised_tokens": 0, "elapsed_s": 0.0}
    if args.resume:
        start = load_checkpoint(engine, ckpt_dir)
        if start["world_size"] != world:
            raise ValueError(f"{ckpt_dir}: the run used {start['world_size']} rank(s), not {world}: "
                             "the data order depends on it; resume with the same launcher settings")
        batches.load_state_dict(start["batches"])
        set_rng_state(start["rng"])
        before, before_replies = start.get("before", {}), start.get("before_replies")  # (older checkpoints lack them)
        trim_monitor(engine, run_dir, start["step"], ds_cfg["train_batch_size"])
        print0(f"resumed {run_dir} at step {start['step']} (epoch {batches.epoch})")
    else:
        t_eval = time.time()
        before, before_replies = evaluate(0, generation=True)
        if before:
            print0(f"step 0: {brief(before)} ({time.time() - t_eval:.1f}s)")
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        saved_args = {k: v for k, v in vars(args).items() if k not in ("ds_base", "resume", "local_rank")}
        write_json(os.path.join(run_dir, "args.json"), saved_args)
        write_json(os.path.join(run_dir, "ds_config.json"), ds_cfg)
        tok.save(os.path.join(run_dir, "tokenizer.model"))

    # ---- training
    progress = Progress(total_steps, args.log_every, live=False if args.quiet else None) if rank == 0 else None
    show = progress.note if progress else (lambda text: None)
    tokens, sup_tokens, slots = start["tokens"], start["supervised_tokens"], 0
    t_train, tokens_at_start = time.time(), tokens
    for step in range(start["step"] + 1, total_steps + 1):
        epochs_done = batches.epoch + batches.epoch_done  # an epoch may end in the middle of a step
        micro = [batches.next() for _ in range(args.grad_accum)]
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        # memory is measured at the second step: Adam's state appears at the first
        measure = (lambda: record_memory(engine, args, n_params, world, run_dir, show)) if step == 2 else None
        nll, n_sup, n_tok, n_slots = train_step(engine, micro, world, device, measure)
        slots += int(n_slots)
        loss = nll / max(n_sup, 1.0)
        tokens, sup_tokens = tokens + int(n_tok), sup_tokens + int(n_sup)
        session = time.time() - t_train
        elapsed = start["elapsed_s"] + session
        tok_per_s = (tokens - tokens_at_start) / session
        scale = current_loss_scale(engine)
        log_events(engine, step, "Train", loss=loss, lr=lr, tokens=tokens, supervised_tokens=sup_tokens,
                   tokens_per_s=tok_per_s, elapsed_s=elapsed, skipped_steps=engine.skipped_steps, loss_scale=scale)
        if progress:
            progress.update(step, loss, lr, tok_per_s, elapsed, session / (step - start["step"]) * (total_steps - step))
            if engine.skipped_steps and step % args.log_every == 0:
                show(f"step {step}: {engine.skipped_steps} step(s) skipped so far (fp16 overflow), loss scale {scale:g}")
        # an epoch that ends in the last 1% of the run is left to the final evaluation
        ended = batches.epoch + batches.epoch_done > epochs_done
        epoch_end = all_sum([float(ended)], device)[0] > 0 and total_steps - step > total_steps // 100
        if step < total_steps and (epoch_end or (args.eval_every and step % args.eval_every == 0)):
            m, _ = evaluate(step, generation=epoch_end)
            if m:
                show(f"step {step}{' (end of epoch)' if epoch_end else ''}: {brief(m)}")
        if args.save_every and step % args.save_every == 0 and step < total_steps:
            save_checkpoint(engine, ckpt_dir, step, keep=args.keep_checkpoints, client_state={
                "step": step, "batches": batches.state_dict(), "tokens": tokens, "supervised_tokens": sup_tokens,
                "elapsed_s": elapsed, "before": before, "before_replies": before_replies, "world_size": world,
                "rng": rng_state()})
    if progress:
        progress.close()
    train_time = time.time() - t_train

    # ---- evaluate and save
    state = full_state_dict(engine)  # fp32, gathered from the shards: every rank takes part, rank 0 keeps it
    after, after_replies = evaluate(total_steps, generation=True, state=state)  # the weights being saved
    if rank == 0:
        save_model(run_dir, state, cfg, tok)
        replies = {"step 0": before_replies, "trained": after_replies}
        samples = pick_samples(evals, {k: v for k, v in replies.items() if v is not None}) if evals else []
        metrics = {"val_loss": after.get("val_loss", float("nan")), "val_ppl": after.get("val_ppl", float("nan")),
                   "val_loss_before": before.get("val_loss", float("nan")), "exact_match": after.get("exact_match", {}),
                   "bleu": after.get("bleu"), "bleu_tokenize": after.get("bleu_tokenize"), "before": before, "after": after, "samples": samples,
                   "train_tokens_per_s": (tokens - tokens_at_start) / train_time,
                   "wall_time_s": time.time() - t_start, "train_time_s": train_time, "steps": total_steps,
                   "skipped_steps": engine.skipped_steps, "tokens": tokens, "supervised_tokens": sup_tokens,
                   "params": n_params, "dtype": args.dtype, "zero_stage": args.zero_stage, "world_size": world,
                   "padding_fraction": 1 - (tokens - tokens_at_start) / max(slots, 1),
                   "invalid_records_skipped": sum(f.skipped for f in files),
                   "conversations_truncated": counts["truncated"], "conversations_dropped": counts["dropped"]}
        write_json(os.path.join(run_dir, "metrics.json"), metrics)
        point_latest(run_dir)
        try:
            plot_run(run_dir)
        except Exception as e:  # a picture is not worth losing the end of a run over
            print0(f"loss.png not drawn ({type(e).__name__}: {e}); try: python -m nanosft.plot {run_dir}")
        if samples:
            print0("sample conversations (held-out prompts):\n"
                   + format_samples(samples, [k for k in replies if k in samples[0]]))
        if before or after:
            print0(table({"step 0": before, "trained": after}))
        print0(f"padding: {metrics['padding_fraction']:.1%} of the token positions computed")
        print0(f"saved {run_dir} ({clock(metrics['wall_time_s'])}, loss curve in loss.png); "
               f"chat with: python chat.py --ckpt {run_dir}")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # leave the process group before the interpreter exits


def brief(m):
    """One line of evaluation results."""
    parts = [f"val loss {m['val_loss']:.4f} (ppl {m['val_ppl']:.3f})"] if "val_loss" in m else []
    if "exact_match" in m:
        parts.append(f"exact match {m['exact_match']['overall']:.1%}, BLEU {m['bleu']:.2f}")
    return ", ".join(parts)


if __name__ == "__main__":
    # A crash in native code (a segfault, or an abort such as "terminate called ...") then prints the
    # Python stack of every thread on stderr instead of dying silently: with several ranks, the
    # only clue to which one failed and where.
    faulthandler.enable(all_threads=True)
    args = parse_args()
    try:
        main(args)
    except (ValueError, OSError) as e:  # bad input: the message names file, line, reason
        raise SystemExit(f"error: {e}")
