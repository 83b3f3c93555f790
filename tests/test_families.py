"""The base models people fine-tune today, one per family, made with transformers at random weights
and a byte-level tokenizer of the family's kind with the chat template its models ship (conftest.py,
chat_templates.py): Llama 3.2 (llama3 rope scaling, tied embeddings), Qwen2.5 (q/k/v biases, tied,
spare embedding rows past the tokenizer), Qwen3 (QK-norm, head_dim != dim / n_head) and SmolLM2.
nanosft loads each with transformers' logits, fine-tunes it in its own chat format, exports it, and
transformers loads the export with the same logits and the same chat rendering; chat.py talks to it."""

import json

import pytest
import torch
from chat_templates import LLAMA32, QWEN3, QWEN25, SMOLLM2
from conftest import ROPE_LLAMA3, byte_level_tokenizer, run, run_chat, run_train

from nanosft.checkpoint import load_model
from nanosft.data import load_jsonl
from nanosft.generate import reply
from nanosft.template import ChatTemplate

# family -> (transformers class prefix, config fields, chat template, spare embedding rows)
FAMILIES = {
    "llama3": ("Llama", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0,
                             rope_scaling=ROPE_LLAMA3), LLAMA32, 0),
    "qwen2": ("Qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True), QWEN25, 37),
    "qwen3": ("Qwen3", dict(num_key_value_heads=2, tie_word_embeddings=True, head_dim=32), QWEN3, 0),
    "smollm2": ("Llama", dict(num_key_value_heads=4, tie_word_embeddings=True, rope_theta=100000.0), SMOLLM2, 0),
}


def family_model(family, directory):
    """A random base model of `family` in `directory` (weights, config, tokenizer files) -> the
    transformers model."""
    import transformers
    arch, fields, template, spare = FAMILIES[family]
    hf_tok = byte_level_tokenizer(directory, family, template)
    torch.manual_seed(0)
    cfg = getattr(transformers, arch + "Config")(
        vocab_size=hf_tok.get_vocab_size() + spare, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6, **fields)
    model = getattr(transformers, arch + "ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:  # random norms and biases, so a mixed-up name cannot hide
                p.normal_(1.0 if "norm" in n else 0.0, 0.1)
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def base(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    return request.param, d, family_model(request.param, d)


def logits(model, ids):
    out = model(torch.tensor([ids]))
    return (out.logits if hasattr(out, "logits") else out)[0]


def test_a_base_model_loads_with_the_logits_of_transformers(base):
    family, d, ref = base
    ours, tok = load_model(d)
    assert tok.FILE == "tokenizer.json" and ours.cfg.vocab_size == ref.config.vocab_size  # (Qwen's spare rows kept)
    assert ChatTemplate(tok).format == ("llama3" if family == "llama3" else "chatml")
    ids = ChatTemplate(tok).render([{"role": "user", "content": "What is 12 plus 30? 你好 👋"},
                                    {"role": "assistant", "content": "42."}])[0]
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, ids), logits(ref, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_base_model_fine_tunes_in_its_own_format_exports_and_transformers_reloads_it(base, tiny_data, tmp_path):
    import transformers
    family, d, _ = base
    out = tmp_path / "tuned"
    r = run_train("--init-from", str(d), "--data", str(tiny_data / "train.jsonl"), "--val-data",
                  str(tiny_data / "val.jsonl"), "--eval-data", "", "--out", str(out), "--steps", "20",
                  "--max-seq-len", "128", "--batch-size", "4", "--dtype", "fp32", "--lr", "3e-3", "--cache-dir", "")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["val_loss"] < m["val_loss_before"]  # it learned from the chat data
    tuned, tok = load_model(out)
    template = ChatTemplate(tok)
    assert template.format == ("llama3" if family == "llama3" else "chatml")  # the base's format, kept
    assert not (out / "tokenizer.model").exists() and (out / "tokenizer.json").exists()

    exported = tmp_path / "exported"
    r = run([__import__("sys").executable, "-m", "nanosft.export", str(out), str(exported)])
    assert r.returncode == 0, r.stderr[-2000:]
    ref = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(exported)
    conversation = load_jsonl(tiny_data / "val.jsonl")[0]["messages"]
    ids = template.render(conversation)[0]
    assert ids == list(ref_tok.apply_chat_template(conversation, tokenize=True, return_dict=False))
    with torch.no_grad():
        torch.testing.assert_close(logits(ref, ids), logits(tuned, ids), rtol=1e-4, atol=1e-4)

    # chat.py: greedy, its reply is the model's (after 20 steps often just the end of turn), and sampled it talks
    prompt = "Which is larger, 418 or 96?"
    r = run_chat("--ckpt", str(out), "--prompt", prompt, "--max-new-tokens", "8")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stdout.strip() == reply(tuned, template, [{"role": "user", "content": prompt}], 8).strip()
    r = run_chat("--ckpt", str(out), "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "2", "--seed", "1")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr[-2000:]


@pytest.mark.slow
def test_a_new_model_trains_with_a_byte_level_tokenizer_of_its_own_in_chatml(tiny_data, tmp_path):
    import transformers
    from conftest import TINY
    out = tmp_path / "run"
    r = run_train("--data", str(tiny_data / "train.jsonl"), "--val-data", "", "--eval-data", "", "--out", str(out),
                  "--steps", "3", "--dtype", "fp32", *TINY, "--tokenizer-kind", "bytelevel", "--chat-format", "chatml")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    model, tok = load_model(out)
    assert tok.FILE == "tokenizer.json" and tok.vocab_size == 300 + 2  # (+ <|im_start|>, <|im_end|>)
    template = ChatTemplate(tok)
    assert template.format == "chatml"
    ref_tok = transformers.AutoTokenizer.from_pretrained(out)
    for rec in load_jsonl(tiny_data / "train.jsonl")[:20]:
        assert template.render(rec["messages"])[0] == list(ref_tok.apply_chat_template(
            rec["messages"], tokenize=True, return_dict=False))
    r = run_chat("--ckpt", str(out), "--prompt", "你好 👋", "--max-new-tokens", "4", "--temperature", "1")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
