"""Shared by the tests that start real processes: a tiny training run on generated data, made once
per test session (test_train.py checks it, test_chat.py talks to it)."""

import copy
import os
import signal
import subprocess
import sys

import pytest
import sentencepiece as spm
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "data"))
from generate import generate, write_jsonl  # noqa: E402  (data/generate.py)

from nanosft.checkpoint import save_model  # noqa: E402
from nanosft.data import epoch_rows, load_jsonl, render_conversations  # noqa: E402
from nanosft.model import ModelConfig, Transformer  # noqa: E402
from nanosft.template import ChatTemplate  # noqa: E402
from nanosft.tokenizer import Tokenizer  # noqa: E402

# a model small enough to train in seconds; every flag spelled out so tests can rebuild it
TINY = ["--dim", "32", "--n-layer", "2", "--n-head", "4", "--n-kv-head", "2", "--vocab-size", "300",
        "--max-seq-len", "128", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-2", "--warmup-steps", "2",
        "--seed", "7", "--cache-dir", "",  # no cache: every test run tokenizes (test_formats.py tests the cache)
        "--optimizer", "adamw"]  # what test_train.py's plain PyTorch loop does; test_optimizer.py tests Muon
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def run(cmd, **kw):
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **kw)


def kill_at(cmd, step):
    """Start a training command and SIGKILL it, the launcher and every rank alike, without warning,
    as soon as it prints `step <step>/`. -> its return code (-SIGKILL unless it ended first)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         start_new_session=True)
    for line in p.stdout:
        if line.startswith(f"step {step}/"):
            os.killpg(p.pid, signal.SIGKILL)
            break
    return p.wait()


def run_train(*args):
    return run([sys.executable, os.path.join(ROOT, "train.py"), *args])


def run_chat(*args, **kw):
    return run([sys.executable, os.path.join(ROOT, "chat.py"), *args], **kw)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    train, val, evals = generate(300, 40, 20, seed=3)
    for name, recs in (("train", train), ("val", val), ("eval", evals)):
        write_jsonl(d / f"{name}.jsonl", recs)
    return d


def tiny_start(data_dir, seed=7, world=1):
    """What train.py starts from with TINY's flags on data_dir/train.jsonl, rebuilt without it: the
    initial model (same seed, same tokenizer) and each rank's packed rows of the first epoch."""
    records = load_jsonl(data_dir / "train.jsonl")
    tok = Tokenizer.train([m["content"] for r in records for m in r["messages"]], 300)
    samples, _ = render_conversations(records, ChatTemplate(tok), 129)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layer=2, n_head=4, n_kv_head=2,
                                    max_seq_len=128))
    return model, [epoch_rows(samples, 129, tok.pad_id, seed, 0, rank, world) for rank in range(world)]


@pytest.fixture(scope="session")
def tiny_run(tiny_data):
    """(data dir, run dir) of a 5-step single-process fp32 run."""
    out = tiny_data / "runs" / "tiny"
    r = run_train("--data", str(tiny_data / "train.jsonl"), "--val-data", str(tiny_data / "val.jsonl"),
                  "--eval-data", str(tiny_data / "eval.jsonl"), "--out", str(out), "--steps", "5",
                  "--dtype", "fp32", *TINY)
    assert r.returncode == 0, r.stdout + r.stderr
    return tiny_data, out


@pytest.fixture(scope="session")
def babbler(tiny_run, tmp_path_factory):
    """A run directory with an untrained model whose LM head is untied and random: its replies are
    long runs of arbitrary tokens (byte tokens among them), what streaming and sampling tests need."""
    tok = Tokenizer.load(tiny_run[1] / "tokenizer.model")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layer=2, n_head=4, n_kv_head=2,
                                    max_seq_len=128, tie_embeddings=False))
    # At init the residual stream is mostly the current token's embedding, so greedy replies barely
    # depend on earlier turns; 4x larger block weights make what came before change the reply, which
    # the tests of /reset and /system need in order to tell a conversation from a fresh one.
    with torch.no_grad():
        for p in model.layers.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    d = tmp_path_factory.mktemp("babbler")
    save_model(d, model.state_dict(), model.cfg, tok)
    return d


# Hugging Face Llama models for the loader tests: name -> LlamaConfig overrides
ROPE_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # with head_dim 16, all three bands are used
CONFIGS = {
    "mha_untied": dict(num_key_value_heads=4, tie_word_embeddings=False),
    "gqa_tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "mqa_bias": dict(num_key_value_heads=1, attention_bias=True),
    "gqa_llama3_rope": dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=ROPE_LLAMA3),
    "head_dim_32": dict(num_key_value_heads=2, head_dim=32),
    "qwen2": dict(num_key_value_heads=2, tie_word_embeddings=False),  # q/k/v biases, no o_proj bias
    "qwen3": dict(num_key_value_heads=2, head_dim=16),  # QK-norm (attention.py's qk_norm)
    "mistral_window": dict(num_key_value_heads=2, sliding_window=8),  # sliding-window attention
}
HF_CLASSES = {"qwen2": "Qwen2", "qwen3": "Qwen3", "mistral_window": "Mistral"}  # others: Llama


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory):
    """A Llama-style sentencepiece tokenizer.model, as a base model directory ships it."""
    d = tmp_path_factory.mktemp("spm")
    (d / "corpus.txt").write_text("\n".join(f"the number {i} is {'even' if i % 2 == 0 else 'odd'}, 你好 {i * 7}"
                                            for i in range(400)), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "tok"), model_type="bpe",
                                   vocab_size=320, byte_fallback=True, split_digits=True, add_dummy_prefix=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    return d / "tok.model"


def hf_model(name, directory, sp_tokenizer, shard=False, seed=0, dtype=torch.float32):
    """A random transformers model (LlamaForCausalLM, or the class HF_CLASSES names) saved as a
    base model directory with a tokenizer.model. Returns it in fp32, holding the saved weights."""
    import transformers
    torch.manual_seed(seed)
    arch = HF_CLASSES.get(name, "Llama")
    kind = getattr(transformers, arch + "Config"), getattr(transformers, arch + "ForCausalLM")
    cfg = kind[0](vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-6, **CONFIGS[name])
    model = kind[1](cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:  # random norms and biases, so a mixed-up name cannot hide
                p.normal_(1.0 if "norm" in n else 0.0, 0.1)
            if n.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)  # sharp attention, so a wrong rotary angle shows in the logits
        for p in model.parameters():  # what a checkpoint saved in `dtype` holds, kept in fp32
            p.copy_(p.to(dtype).float())
    copy.deepcopy(model).to(dtype).save_pretrained(directory, max_shard_size="40KB" if shard else "5GB")
    (directory / "tokenizer.model").write_bytes(sp_tokenizer.read_bytes())
    return model


# ---- byte-level BPE base models (tokenizer.json), as the families ship them, made here with the
# tokenizers and transformers libraries: each family's pre-tokenizer, special tokens and chat template

def family_corpus():
    import random
    words = ["hello", " world", "The", " quick", "don't", "x = f(y) + 1;", "    def f():", "42", " 1234", "3.14",
             " ", "\n", "\n\n", "\t", "你好", "世界", "こんにちは", "안녕하세요", "😀", "👍🏽", "مرحبا", "café", "user",
             "assistant", "system", " is", " the", " answer", "?", "!", "."]
    rng = random.Random(1)
    return ["".join(rng.choice(words) for _ in range(rng.randint(1, 20))) for _ in range(2000)]


def added(content, special=True, **kw):
    return {"content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": not special,
            "special": special, **kw}


# family -> (pre-tokenizer kind, added tokens, tokenizer_config.json fields)
FAMILIES = {
    "llama3": ("llama3", [added("<|begin_of_text|>"), added("<|end_of_text|>"), added("<|start_header_id|>"),
                          added("<|end_header_id|>"), added("<|eot_id|>")],
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "qwen2": ("qwen2", [added("<|endoftext|>"), added("<|im_start|>"), added("<|im_end|>"),
                        added("<tool_call>", special=False), added("</tool_call>", special=False)],
              {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "qwen3": ("qwen2", [added("<|endoftext|>"), added("<|im_start|>"), added("<|im_end|>"),
                        added("<think>", special=False), added("</think>", special=False)],
              {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "smollm2": ("smollm2", [added("<|endoftext|>"), added("<|im_start|>"), added("<|im_end|>")],
                {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}),
}


def byte_level_tokenizer(directory, family, chat_template, vocab_size=700):
    """tokenizer.json and tokenizer_config.json of `family` in `directory` -> the tokenizers.Tokenizer."""
    import json
    from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, \
        pre_tokenizers, processors, trainers
    from nanosft.bpe import LLAMA3_PATTERN, QWEN2_PATTERN
    kind, specials, config = FAMILIES[family]
    tok = HFTokenizer(models.BPE(ignore_merges=kind == "llama3"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if kind == "smollm2":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN if kind == "llama3" else QWEN2_PATTERN), "isolated"), byte_level])
    if kind == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(family_corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken(t["content"], special=True, normalized=False) for t in specials if t["special"]])
    tok.add_tokens([AddedToken(t["content"], special=False, normalized=True) for t in specials if not t["special"]])
    if family == "llama3":
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                          special_tokens=[(bos, tok.token_to_id(bos))])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {**config, "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": chat_template}), encoding="utf-8")
    return tok
