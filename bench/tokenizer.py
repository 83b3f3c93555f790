"""
Tokenizer benchmark: nanosft's hand-written BPE against the sentencepiece library (C++), and its
byte-level BPE (bpe.py) against Hugging Face's tokenizers library (Rust).

    .venv/bin/python bench/tokenizer.py [--mb 5] [--vocab-size 8000] [--json out.json]

Builds a mixed corpus offline (English: docstrings of Python's own standard library; Chinese:
sentences generated from a word list; plus digits and emoji), then measures
  1. encoding throughput (MB/s) of both encoders on the whole corpus with the same vocabulary
     (a sentencepiece-trained model, which our encoder loads), checking along the way that both
     give identical ids;
  2. compression (tokens per character) on held-out English and Chinese text, for a vocabulary
     trained by our trainer vs one trained by sentencepiece, at the same vocabulary size;
  3. byte-level BPE: a Llama-3-style tokenizer.json trained by the tokenizers library on the same
     lines, encoded by it and by bpe.py (throughput, identical ids).
All encoders run on one thread.
"""

import argparse
import ast
import json
import os
import random
import sys
import sysconfig
import tempfile
import time

import sentencepiece as spm

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # tokenizers' thread pool: one thread, as ours
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanosft.bpe import LLAMA3_PATTERN, load_tokenizer_json  # noqa: E402
from nanosft.tokenizer import Tokenizer  # noqa: E402


def english_lines(max_bytes):
    """Docstrings of the standard library's modules, split into lines."""
    lines, size = [], 0
    stdlib = sysconfig.get_paths()["stdlib"]
    for root, dirs, files in sorted(os.walk(stdlib)):
        dirs[:] = sorted(d for d in dirs if d not in ("test", "site-packages", "idlelib"))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    for line in (doc or "").splitlines():
                        if line.strip():
                            lines.append(line)
                            size += len(line.encode())
                            if size >= max_bytes:
                                return lines
    return lines


ZH_SUBJECTS = "我 你 他 她 我们 你们 他们 老师 学生 医生 朋友 孩子 妈妈 爸爸 公司 政府 科学家 工程师 这个城市 那家商店".split()
ZH_VERBS = "喜欢 看到 需要 知道 觉得 打算 开始 完成 学习 研究 讨论 发现 购买 参观 解决 准备 介绍 支持 改变 记得".split()
ZH_OBJECTS = ("一本书 这个问题 新的方法 中国历史 数学 音乐 电影 天气 晚饭 火车站 图书馆 计算机 人工智能 "
              "语言模型 春天的花 重要的会议 有趣的故事 明天的考试 环境保护 经济发展 传统文化 健康的生活").split()
ZH_ADVERBS = "今天 昨天 明天 经常 已经 一直 终于 也许 非常 真的 突然 慢慢地 认真地".split()
ZH_TAILS = "。|，但是很难。|，所以很高兴。|吗？|！|，因为时间不够。|，然后回家了。|，这很有意思。".split("|")


def chinese_lines(n, rng):
    out = []
    for _ in range(n):
        parts = [rng.choice(ZH_SUBJECTS)]
        if rng.random() < 0.5:
            parts.append(rng.choice(ZH_ADVERBS))
        parts += [rng.choice(ZH_VERBS), rng.choice(ZH_OBJECTS), rng.choice(ZH_TAILS)]
        if rng.random() < 0.2:
            parts.append(f"{rng.randint(1, 2025)}年")
        out.append("".join(parts))
    return out


def corpus(mb, seed=0):
    rng = random.Random(seed)
    en = english_lines(int(mb * 0.7 * 1e6))
    zh = []
    while sum(len(l.encode()) for l in zh[-1000:]) * len(zh) / max(len(zh[-1000:]), 1) < mb * 0.3 * 1e6:
        zh += chinese_lines(1000, rng)
    extras = [f"{rng.choice(['🚀', '🙂', '❤️', '👍'])} {rng.randint(0, 10**6)}" for _ in range(len(en) // 50)]
    return en, zh, extras


def timed(fn, *a):
    t = time.perf_counter()
    out = fn(*a)
    return out, time.perf_counter() - t


def byte_level(train, lines, vocab_size):
    """Encode `lines` with a Llama-3-style byte-level BPE trained by the tokenizers library (a
    test and benchmark dependency, through transformers) and with bpe.py reading its file."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, models, pre_tokenizers, trainers
    hf = HFTokenizer(models.BPE(ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.train_from_iterator(train, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    with tempfile.TemporaryDirectory() as d:
        hf.save(os.path.join(d, "tokenizer.json"))
        ours = load_tokenizer_json(os.path.join(d, "tokenizer.json"))
    ids_ours, t_ours = timed(lambda: [ours.encode(l) for l in lines])
    ids_hf, t_hf = timed(lambda: [e.ids for e in hf.encode_batch(lines, add_special_tokens=False)])
    return {"nanosft_s": t_ours, "tokenizers_s": t_hf, "ratio": t_hf / t_ours, "identical_ids": ids_ours == ids_hf}


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--mb", type=float, default=5.0, help="corpus size in MB (UTF-8)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--train-fraction", type=float, default=0.4, help="share of the corpus used for training")
    p.add_argument("--json", default="", help="also write the figures here")
    args = p.parse_args()

    en, zh, extras = corpus(args.mb)
    rng = random.Random(1)
    mixed = en + zh + extras
    rng.shuffle(mixed)
    n_bytes = sum(len(l.encode()) for l in mixed) + len(mixed)
    train = mixed[:int(len(mixed) * args.train_fraction)]
    held_en, held_zh = en[-2000:], zh[-2000:]  # compression is measured on these
    print(f"corpus: {n_bytes / 1e6:.2f} MB in {len(mixed):,} lines ({len(en):,} English, {len(zh):,} Chinese); "
          f"training on {len(train):,} lines, vocab {args.vocab_size}")

    # --- train both ways
    ours, t_ours = timed(Tokenizer.train, train, args.vocab_size)
    theirs, t_spm = timed(Tokenizer.train_spm, train, args.vocab_size)
    with tempfile.TemporaryDirectory() as d:
        theirs.save(os.path.join(d, "spm.model"))
        sp = spm.SentencePieceProcessor(model_file=os.path.join(d, "spm.model"), num_threads=1)
        ours.save(os.path.join(d, "ours.model"))
        sp_ours = spm.SentencePieceProcessor(model_file=os.path.join(d, "ours.model"), num_threads=1)
        encoder = Tokenizer.load(os.path.join(d, "spm.model"))  # fresh: its word cache starts empty

    # --- throughput, same vocabulary (the sentencepiece-trained one), cold caches
    ids_ours, t_enc_ours = timed(lambda: [encoder.encode(l) for l in mixed])
    ids_sp, t_enc_sp = timed(lambda: sp.encode(mixed, num_threads=1))
    identical = ids_ours == ids_sp
    _, t_enc_warm = timed(lambda: [encoder.encode(l) for l in mixed])

    # --- compression: tokens per character on held-out text
    def tpc(tok, lines):
        return sum(len(tok.encode(l)) for l in lines) / sum(len(l) for l in lines)

    res = {
        "corpus_mb": n_bytes / 1e6, "vocab_size": args.vocab_size, "train_lines": len(train),
        "train_s": {"nanosft": t_ours, "sentencepiece": t_spm},
        "encode_mb_per_s": {"nanosft": n_bytes / 1e6 / t_enc_ours, "nanosft_warm_cache": n_bytes / 1e6 / t_enc_warm,
                            "sentencepiece": n_bytes / 1e6 / t_enc_sp},
        "identical_ids": identical,
        "tokens_per_char": {
            "english": {"nanosft_vocab": tpc(sp_ours, held_en), "sentencepiece_vocab": tpc(sp, held_en)},
            "chinese": {"nanosft_vocab": tpc(sp_ours, held_zh), "sentencepiece_vocab": tpc(sp, held_zh)},
        },
    }
    res["throughput_ratio"] = res["encode_mb_per_s"]["nanosft"] / res["encode_mb_per_s"]["sentencepiece"]
    bl = byte_level(train, mixed, args.vocab_size)
    res["byte_level"] = {"encode_mb_per_s": {"nanosft": n_bytes / 1e6 / bl["nanosft_s"],
                                             "tokenizers": n_bytes / 1e6 / bl["tokenizers_s"]},
                         "throughput_ratio": bl["ratio"], "identical_ids": bl["identical_ids"]}
    for lang in ("english", "chinese"):
        t = res["tokens_per_char"][lang]
        t["ratio"] = t["nanosft_vocab"] / t["sentencepiece_vocab"]

    print(f"\n{'':34} {'nanosft':>10} {'sentencepiece':>14} {'ratio':>7}")
    e = res["encode_mb_per_s"]
    print(f"{'encode MB/s (cold cache)':34} {e['nanosft']:10.2f} {e['sentencepiece']:14.2f} {res['throughput_ratio']:7.2f}")
    print(f"{'encode MB/s (warm cache)':34} {e['nanosft_warm_cache']:10.2f} {e['sentencepiece']:14.2f} "
          f"{e['nanosft_warm_cache'] / e['sentencepiece']:7.2f}")
    for lang in ("english", "chinese"):
        t = res["tokens_per_char"][lang]
        print(f"{'tokens/char ' + lang + ' (own vocab)':34} {t['nanosft_vocab']:10.4f} {t['sentencepiece_vocab']:14.4f} {t['ratio']:7.3f}")
    print(f"{'train s':34} {t_ours:10.2f} {t_spm:14.2f}")
    print(f"identical ids on the whole corpus: {identical}")
    b = res["byte_level"]
    print(f"\nbyte-level BPE (Llama 3 style)     {'nanosft':>10} {'tokenizers':>14} {'ratio':>7}")
    print(f"{'encode MB/s (cold cache)':34} {b['encode_mb_per_s']['nanosft']:10.2f} "
          f"{b['encode_mb_per_s']['tokenizers']:14.2f} {b['throughput_ratio']:7.2f}")
    print(f"identical ids on the whole corpus: {b['identical_ids']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    if not (identical and b["identical_ids"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
