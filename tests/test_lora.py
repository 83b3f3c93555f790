"""lora.py and adapter.py promise: a fresh adapter changes nothing; a trained one computes the same
unmerged as merged; an adapter on q_proj of nanosft's fused qkv matrix is PEFT's adapter on a
separate q_proj (PEFT loads nanosft's files onto transformers' model with nanosft's logits, and
nanosft loads PEFT's); only the adapters train, with gradient checkpointing too; bad settings and
adapters that do not fit are refused naming what is wrong."""

import json
import re

import pytest
import torch
from conftest import hf_model

from nanosft.adapter import load_adapter, save_adapter
from nanosft.checkpoint import load_model
from nanosft.lora import LoRALinear, add_lora, expand_targets, lora_modules, merge_lora, split_merged
from nanosft.model import ModelConfig, Transformer


def tiny(**kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=97, dim=32, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=32, **kw))


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            for b in m.lora_B.values():
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


IDX = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))


def test_a_fresh_adapter_leaves_the_logits_exactly_as_they_were():
    model = tiny().eval()
    before = model(IDX)
    add_lora(model, ["all"], rank=4, alpha=8)
    assert torch.equal(model(IDX), before)


@pytest.mark.parametrize("targets", [["all"], ["q_proj", "v_proj"], ["k_proj"], ["up_proj", "o_proj"]])
def test_unmerged_and_merged_compute_the_same(targets):
    model = tiny(qkv_bias=True).eval()
    add_lora(model, targets, rank=4, alpha=8)
    randomize_adapters(model)
    unmerged = model(IDX)
    state, adapters = split_merged(dict(model.named_parameters()), model)
    assert adapters and all(".lora_" in k for k in adapters)
    plain = tiny(qkv_bias=True).eval()
    plain.load_state_dict({**state, "lm_head.weight": state["embed_tokens.weight"]})
    torch.testing.assert_close(plain(IDX), unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merge_lora(model)(IDX), unmerged, rtol=1e-5, atol=1e-5)
    assert not lora_modules(model)


def test_only_the_adapters_train_and_gradient_checkpointing_works_with_a_frozen_embedding():
    """DeepSpeed-Chat's LoRA + gradient checkpointing fails with "element 0 of tensors does not require
    grad" (its checkpointed blocks see an input that needs no gradient); here the block is recomputed
    with non-reentrant checkpointing, which follows the adapters' parameters instead."""
    for checkpointing in (False, True):
        model = tiny()
        add_lora(model, ["qkv", "down_proj"], rank=2, alpha=4)
        model.grad_checkpointing = checkpointing
        loss, n = model(IDX[:, :-1], targets=IDX[:, 1:])
        (loss / n).backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        assert grads and all(".lora_" in name for name in grads)
        assert all(g.abs().sum() == 0 for name, g in grads.items() if "lora_A" in name)  # B = 0: none reaches A yet
        assert all(g.abs().sum() > 0 for name, g in grads.items() if "lora_B" in name)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(g.numel() for g in grads.values())


def test_an_adapter_on_q_rows_is_its_own_matrix_pair_on_those_rows_only():
    model = tiny()
    add_lora(model, ["q_proj"], rank=3, alpha=3)
    m = model.layers[0].self_attn.qkv_proj
    assert isinstance(m, LoRALinear) and m.rows == {"q_proj": (0, 32)}
    assert m.lora_A["q_proj"].shape == (3, 32) and m.lora_B["q_proj"].shape == (32, 3)
    randomize_adapters(model)
    assert torch.equal(m.fold(m.weight, m.lora_A, m.lora_B)[32:], m.weight[32:])  # k and v rows untouched


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["all"]])
def test_peft_loads_a_nanosft_adapter_onto_transformers_and_gives_the_same_logits(tmp_path, sp_tokenizer, targets):
    from peft import PeftModel
    ref = hf_model("qwen2", tmp_path / "base", sp_tokenizer)  # (q/k/v biases)
    ours, _ = load_model(tmp_path / "base")
    add_lora(ours, targets, rank=4, alpha=8)
    randomize_adapters(ours)
    state, adapters = split_merged({k: v.detach() for k, v in ours.named_parameters()}, ours)
    save_adapter(tmp_path / "adapter", adapters, ours, str(tmp_path / "base"))
    peft = PeftModel.from_pretrained(ref, str(tmp_path / "adapter")).eval()
    idx = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(idx)[..., :320], peft(idx).logits, rtol=1e-4, atol=1e-4)  # (+ chat markers)


def test_nanosft_loads_an_adapter_peft_saved_with_the_same_logits(tmp_path, sp_tokenizer):
    from peft import LoraConfig, get_peft_model
    ref = hf_model("gqa_llama3_rope", tmp_path / "base", sp_tokenizer)
    peft = get_peft_model(ref, LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "k_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft.save_pretrained(str(tmp_path / "adapter"))
    ours, _ = load_model(tmp_path / "base")
    load_adapter(tmp_path / "adapter", ours)
    idx = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(idx)[..., :320], peft.eval()(idx).logits, rtol=1e-4, atol=1e-4)


def test_bad_settings_are_refused_naming_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="rank must be at least 1"):
        add_lora(tiny(), ["all"], rank=0, alpha=8)
    with pytest.raises(ValueError, match="LoRA target 'query' matches no projection"):
        expand_targets(["q_proj", "query"])
    model = tiny()
    add_lora(model, ["q_proj"], rank=4, alpha=8)
    _, adapters = split_merged(dict(model.named_parameters()), model)
    save_adapter(tmp_path / "a", adapters, model)
    with pytest.raises(ValueError, match=r"q_proj.lora_A.weight is \(4, 32\), this model with r=4 needs \(4, 64\)"):
        load_adapter(tmp_path / "a", Transformer(ModelConfig(vocab_size=97, dim=64, n_layer=2, n_head=4, max_seq_len=32)))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(ValueError, match=r"this model with r=8 needs \(8, 32\)"):
        load_adapter(tmp_path / "a", tiny())
    for change, complaint in (({"use_dora": True}, "use_dora=True is not supported"),
                              ({"target_modules": ["embed_tokens"]}, "target_modules ['embed_tokens']"),
                              ({"r": 0}, "r must be a whole number of at least 1")):
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=re.escape(complaint)):
            load_adapter(tmp_path / "a", tiny())
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        load_adapter(tmp_path / "nothing", tiny())


@pytest.mark.slow
def test_a_lora_run_saves_the_merged_model_and_the_adapter_and_chat_talks_through_either(tiny_run, tmp_path):
    from conftest import run_chat, run_train
    data, base = tiny_run
    out = tmp_path / "lora"
    r = run_train("--init-from", str(base), "--data", str(data / "train.jsonl"), "--val-data", "", "--eval-data", "",
                  "--out", str(out), "--steps", "4", "--lora-rank", "4", "--lora-targets", "attn,down_proj",
                  "--lora-lr", "2e-2", "--batch-size", "2", "--max-seq-len", "128", "--dtype", "fp32", "--cache-dir", "")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    memory = json.loads((out / "memory.json").read_text())
    n = memory["trained_params"]
    assert f"({n:,} trained: LoRA rank 4)" in r.stdout and n < memory["params"] / 5
    assert memory["per_rank"][0]["cpu"]["gradients"] == 4 * n  # fp32 gradients for the adapters alone
    merged, _ = load_model(out)
    unmerged, _ = load_model(base)
    load_adapter(out, unmerged)
    assert torch.equal(merged.state_dict()["embed_tokens.weight"], unmerged.state_dict()["embed_tokens.weight"])
    with torch.no_grad():
        torch.testing.assert_close(merged(IDX % 300), unmerged.eval()(IDX % 300), rtol=1e-5, atol=1e-5)
    prompt = ["--prompt", "Which is larger, 418 or 96?", "--max-new-tokens", "8"]
    a, b = run_chat("--ckpt", str(out), *prompt), run_chat("--ckpt", str(base), "--adapter", str(out), *prompt)
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout, a.stderr + b.stderr
    r = run_chat("--ckpt", str(base), "--adapter", str(tmp_path / "none"), *prompt)
    assert r.returncode == 1 and "adapter_config.json not found" in r.stderr and "Traceback" not in r.stderr
    r = run_train("--init-from", str(base), "--lora-rank", "4", "--lora-targets", "attn,query")
    assert r.returncode == 2 and "--lora-targets: LoRA target 'query' matches no projection" in r.stderr
