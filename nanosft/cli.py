"""
The command-line tools around the data pipeline, for looking at what train.py will see, and the
one that writes a trained model quantized (quantize.py):

    python -m nanosft.tokenizer train --input data/train.jsonl --vocab-size 2000 --out tok.model
    python -m nanosft.tokenizer train --kind bytelevel --input data/train.jsonl --out tokenizer.json
    echo "Hello 世界" | python -m nanosft.tokenizer encode --model tok.model     # one line of ids per line
    echo "1 2 3" | python -m nanosft.tokenizer decode --model tok.model          # one line of text per line
    python -m nanosft.tokenizer inspect --model tok.model "Hello 世界"             # pieces with their ids
    python -m nanosft.tokenizer inspect --model tok.model --chat data/train.jsonl  # supervised tokens in green
    python -m nanosft.tokenizer inspect --model path/to/Qwen2.5-0.5B --chat data/train.jsonl  # in its ChatML
    python -m nanosft.data check my_train.jsonl          # exactly the validation train.py runs
    python -m nanosft.data stats my_train.jsonl --tokenizer runs/latest   # lengths, supervised share, a sample
    python -m nanosft.quantize --ckpt runs/latest --method int8 --out runs/latest-int8   # or --method int4

--model and --tokenizer take a .model file (sentencepiece's or ours), a tokenizer.json, or a directory
holding either (a run, a Hugging Face model: then in the chat format its chat template names). tokenizer.py,
data.py and quantize.py forward `python -m` to tokenizer_main, data_main and quantize_main here.
"""

import argparse
import os
import sys
from collections import Counter

import numpy as np

from nanosft.checkpoint import load_model, save_model
from nanosft.data import error_list, load_conversations, load_jsonl, load_pairs, render_conversations, render_pairs
from nanosft.formats import FORMATS, PAIR_FORMATS, read_records
from nanosft.quantize import QUANTIZE, quantization, quantize_model
from nanosft.bpe import ByteLevelBPE
from nanosft.template import FORMATS as CHAT_FORMATS
from nanosft.template import TRAIN_ON, ChatTemplate, with_markers
from nanosft.tokenizer import Tokenizer
from nanosft.tokenizer_dir import load_tokenizer


# -----------------------------------------------------------------------------
# python -m nanosft.tokenizer train|encode|decode|inspect

def _cli_texts(paths):
    """Training text: the message contents of chat files (.jsonl, .json) in any format train.py
    reads, read and checked as it reads them; the lines of any other file."""
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
    data = sys.stdin.buffer.read()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the text after the final newline is not a line
    for n, raw in enumerate(lines, 1):
        try:
            yield n, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SystemExit(f"stdin:{n}: invalid UTF-8 ({e.reason} at byte {e.start})")


def _cli_inspect_chat(tok, path, count, chat_format):
    tty = sys.stdout.isatty()  # green: supervised (in the loss), red: not; plain text: [supervised]
    print("\033[32msupervised\033[0m  \033[31mnot supervised\033[0m" if tty else "[supervised]  not supervised")
    template = ChatTemplate(with_markers(tok, chat_format), chat_format)
    for rec in load_jsonl(path)[:count]:
        ids, mask = template.render(rec["messages"])
        print(show_tokens(template.tok, ids, mask, tty))
        print(f"  {len(ids)} tokens, {sum(mask)} supervised")


def tokenizer_main(argv=None):
    p = argparse.ArgumentParser(prog="python -m nanosft.tokenizer", description="train, use and inspect tokenizers")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a tokenizer on chat JSONL or text files")
    t.add_argument("--input", nargs="+", required=True)
    t.add_argument("--vocab-size", type=int, default=1024)
    t.add_argument("--trainer", choices=["nanosft", "spm"], default="nanosft",
                   help="for --kind sentencepiece: by hand (readable) or with the sentencepiece library")
    t.add_argument("--kind", choices=["sentencepiece", "bytelevel"], default="sentencepiece",
                   help="sentencepiece: a .model (tokenizer.py); bytelevel: a GPT-style tokenizer.json (bpe.py)")
    t.add_argument("--out", required=True)
    for name in ("encode", "decode", "inspect"):
        c = sub.add_parser(name)
        c.add_argument("--model", required=True, help=".model or tokenizer.json file, or a model directory")
    sub.choices["inspect"].add_argument("--chat-format", choices=CHAT_FORMATS, default=None,
                                        help="with --chat (default: the one the tokenizer's chat template names)")
    sub.choices["inspect"].add_argument("text", nargs="?", help="text to show as pieces")
    sub.choices["inspect"].add_argument("--chat", help="chat JSONL: show the rendering with its loss mask")
    sub.choices["inspect"].add_argument("-n", type=int, default=3, help="conversations to show")
    args = p.parse_args(argv)
    sys.stdout.reconfigure(encoding="utf-8")
    try:
        if args.cmd == "train":
            texts = list(_cli_texts(args.input))
            if args.kind == "bytelevel":
                tok = ByteLevelBPE.train(texts, args.vocab_size, Tokenizer.CHAT_TOKENS)
            else:
                tok = (Tokenizer.train_spm if args.trainer == "spm" else Tokenizer.train)(texts, args.vocab_size)
            tok.save(args.out)
            print(f"{args.out}: {tok.vocab_size} tokens from {len(texts)} texts")
            return
        tok = load_tokenizer(args.model)
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
            _cli_inspect_chat(tok, args.chat, args.n, args.chat_format)
        else:
            text = args.text if args.text is not None else sys.stdin.read()
            print(" ".join(f"{tok.id_to_piece(i)}({i})" for i in tok.encode(text)))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")


# -----------------------------------------------------------------------------
# python -m nanosft.data check|stats: the validation train.py runs, on its own, and what it makes of the data

def check_files(paths, fmt="auto"):
    """Validate training files as train.py does -> (report, number of bad records). The report is
    one line when all is well, else the bad records of each file."""
    lines, bad, formats, pairs = [], 0, Counter(), 0
    for path in paths:
        try:
            if holds_pairs(path):  # preference pairs, for reward models and DPO
                records, errors = load_pairs(path, fmt if fmt in PAIR_FORMATS else "auto", skip_invalid=True)
                pairs += len(records)
            else:
                records, errors = load_conversations(path, fmt if fmt in FORMATS else "auto", skip_invalid=True)
        except (ValueError, OSError) as e:  # a file that cannot be read to its end
            lines.append(str(e))
            bad += 1
            continue
        formats.update(r["format"] for r in records)
        bad += len(errors)
        if errors:
            lines.append(error_list(path, errors))
        elif not records:  # train.py refuses a file with nothing to learn from: so does the check
            lines.append(f"{path}: no conversations in the file")
            bad += 1
    kinds = by_format(formats) or "none"
    count = sum(formats.values())
    what = ([f"{count - pairs} good conversation(s)"] if count > pairs or not pairs else []) \
        + ([f"{pairs} good preference pair(s)"] if pairs else [])
    summary = f"{' and '.join(what)} in {len(paths)} file(s) ({kinds})"
    lines.append(f"{summary}, {bad} bad record(s)" if bad else f"ok: {summary}")
    return "\n".join(lines), bad


def holds_pairs(path):
    """Whether a data file holds preference pairs: its first readable record has a "rejected" reply."""
    for _, rec, _ in read_records(path):
        if isinstance(rec, dict):
            return "rejected" in rec
    return False


def by_format(counts):
    """Counter of format names -> "2 in alpaca format, 1 in messages format" (not "1 messages")."""
    return ", ".join(f"{n} in {f} format" for f, n in sorted(counts.items()))


def show_tokens(tok, ids, mask, tty):
    """One line of pieces with the supervised ones marked: green (red: not) on a terminal, else
    [in brackets]."""
    show = {1: "\033[32m{}\033[0m", 0: "\033[31m{}\033[0m"} if tty else {1: "[{}]", 0: "{}"}
    return " ".join(show[int(m)].format(tok.id_to_piece(int(i))) for i, m in zip(ids, mask))


def read_valid(paths, load, what):
    """The valid records of all files (load(path) -> (records, errors)) -> (records, [the first line
    of stats: how many, in which formats, how many invalid])."""
    records, errors = [], 0
    for path in paths:
        recs, errs = load(path)
        records += recs
        errors += len(errs)
    return records, [f"{len(records)} {what} in {len(paths)} file(s): " + by_format(Counter(r["format"] for r in records))
                     + (f"; {errors} invalid (see: python -m nanosft.data check)" if errors else "")]


def stats(paths, template, row_len, fmt="auto", train_on="all-assistant", tty=False):
    """What train.py would make of these files, as text: conversations per format, their length
    in tokens (a histogram), the share of supervised tokens, what --max-seq-len truncates or
    drops, and one rendered sample with its supervised tokens marked."""
    records, lines = read_valid(paths, lambda path: load_conversations(path, fmt if fmt in FORMATS else "auto",
                                                                       skip_invalid=True), "conversations")
    if not records:
        return "\n".join(lines)
    rendered = [template.render(r["messages"], train_on) for r in records]
    lengths = np.array([len(ids) for ids, _ in rendered])
    supervised = sum(sum(mask) for _, mask in rendered)
    lines.append(f"tokens per conversation: median {int(np.median(lengths))}, mean {lengths.mean():.0f}, "
                 f"max {lengths.max()}; supervised: {supervised / lengths.sum():.1%} of all tokens ({train_on})")
    bounds = [16]  # buckets 1-16, 17-32, 33-64, ... up to the longest
    while bounds[-1] < lengths.max():
        bounds.append(2 * bounds[-1])
    counts = np.histogram(lengths, bins=[0.5] + [b + 0.5 for b in bounds])[0]
    for lo, hi, n in zip([0] + bounds, bounds, counts):
        lines.append(f"  {lo + 1:>6}-{hi:<6} {n:>8}  {'#' * int(np.ceil(40 * n / counts.max()))}")
    _, c = render_conversations(records, template, row_len, train_on)
    lines.append(f"--max-seq-len {row_len - 1}: {(lengths <= row_len).sum()} fit, {c['truncated']} lose their "
                 f"oldest exchanges, {c['dropped']} are left out")
    example = max(range(len(records)), key=lambda i: (len(records[i]["messages"]), -i))  # the most turns
    lines.append("a sample (supervised tokens " + ("green" if tty else "in [brackets]") + "):")
    lines.append(show_tokens(template.tok, *rendered[example], tty))
    return "\n".join(lines)


def pair_stats(paths, template, row_len, fmt="auto", tty=False):
    """What train.py --stage reward|dpo would make of these files of preference pairs: pairs per
    format, the length in tokens of prompts and replies, what --max-seq-len truncates or drops,
    and one rendered pair with its supervised tokens (the replies) marked."""
    records, lines = read_valid(paths, lambda path: load_pairs(path, fmt if fmt in PAIR_FORMATS else "auto",
                                                               skip_invalid=True), "preference pairs")
    if not records:
        return "\n".join(lines)
    samples, c = render_pairs(records, template, row_len)
    if samples:
        reply = {side: np.array([int(s[k][1].sum()) for s in samples]) for k, side in enumerate(("chosen", "rejected"))}
        prompt = np.array([len(s[0][0]) - reply["chosen"][i] for i, s in enumerate(samples)])
        for name, n in (("prompt", prompt), *reply.items()):
            lines.append(f"tokens per {name}{'' if name == 'prompt' else ' reply'}: median {int(np.median(n))}, "
                         f"mean {n.mean():.0f}, max {n.max()}")
    lines.append(f"--max-seq-len {row_len - 1}: {len(samples) - c['truncated']} fit, {c['truncated']} lose their "
                 f"oldest exchanges (both replies kept whole), {c['dropped']} are left out")
    if samples:
        lines.append("a sample (supervised tokens " + ("green" if tty else "in [brackets]") + "):")
        lines += [f"  {side}: " + show_tokens(template.tok, *rows, tty) for side, rows in zip(("chosen", "rejected"), samples[0])]
    return "\n".join(lines)


def data_main(argv=None):
    p = argparse.ArgumentParser(prog="python -m nanosft.data", description="check and describe training data files")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="validate files exactly as train.py does; exit 1 if anything is invalid")
    s = sub.add_parser("stats", help="formats, lengths, supervised share, truncation, a marked-up sample "
                       "(of conversations, or of preference pairs)")
    for q in (c, s):
        q.add_argument("files", nargs="+")
        q.add_argument("--format", default="auto", choices=("auto",) + FORMATS + PAIR_FORMATS)
    s.add_argument("--tokenizer", default="runs/latest", help="a .model file or a run directory")
    s.add_argument("--max-seq-len", type=int, default=256)
    s.add_argument("--train-on", default="all-assistant", choices=TRAIN_ON)
    args = p.parse_args(argv)
    for f in args.files:
        if not os.path.isfile(f):
            p.error(f"{f}: {'a folder, not a file' if os.path.isdir(f) else 'no such file'}")
    if args.cmd == "check":
        report, bad = check_files(args.files, args.format)
        print(report)
        return 1 if bad else 0
    try:
        template = ChatTemplate(with_markers(load_tokenizer(args.tokenizer)))
    except FileNotFoundError:
        p.error(f"--tokenizer {args.tokenizer}: no tokenizer there (train a run first, or name a .model or .json file)")
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    try:
        if holds_pairs(args.files[0]):  # preference pairs (the rows a reward model reads are one token shorter)
            print(pair_stats(args.files, template, args.max_seq_len + 1, args.format, sys.stdout.isatty()))
        else:
            print(stats(args.files, template, args.max_seq_len + 1, args.format, args.train_on, sys.stdout.isatty()))
    except (ValueError, OSError) as e:  # a file that cannot be read to its end
        sys.exit(f"error: {e}")
    return 0


# -----------------------------------------------------------------------------
# python -m nanosft.quantize --ckpt DIR --method int8|int4 --out DIR

def file_bytes(directory):
    """Bytes of a model directory's weight files (model.safetensors, or its shards)."""
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
               if f.startswith("model") and f.endswith(".safetensors"))


def quantize_main(argv=None):
    p = argparse.ArgumentParser(prog="python -m nanosft.quantize",
                                description="write a model's weight-only int8 or int4 copy, which load_model reads back")
    p.add_argument("--ckpt", default="runs/latest", help="a run directory or a Hugging Face directory")
    p.add_argument("--method", required=True, help=f"{' or '.join(QUANTIZE)} (quantize.py)")
    p.add_argument("--out", required=True, help="the directory to write")
    args = p.parse_args(argv)
    # refusals in one line each (no usage text): found out before the model is read
    if args.method not in QUANTIZE:
        sys.exit(f"error: unknown quantization method {args.method!r} (one of: {', '.join(QUANTIZE)})")
    if os.path.realpath(args.out) == os.path.realpath(args.ckpt):
        sys.exit(f"error: --out {args.out} is --ckpt itself; write the quantized copy elsewhere")
    try:  # (no config.json, a model already quantized, an int4 width not in groups of 32, ...)
        model, tok = load_model(args.ckpt)
        quantize_model(model, args.method)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    try:
        save_model(args.out, model.state_dict(), model.cfg, tok, quantization(model))
    except OSError as e:
        sys.exit(f"error: {e}")
    before, after = file_bytes(args.ckpt), file_bytes(args.out)
    print(f"wrote {args.out}: {args.method}, weight files {before:,} -> {after:,} bytes ({before / after:.2f}x smaller)")
