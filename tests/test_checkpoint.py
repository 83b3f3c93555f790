"""checkpoint.py promises: Hugging Face Llama-family checkpoints load into nanosft's model and give
transformers' own logits, generations and gradients; what nanosft saves, transformers loads back
to the same logits; a saved run loads back to the very same model and tokenizer; config keys we do
not implement are refused by name. transformers is the reference (a test-only dependency)."""

import json
import os

import pytest
import torch
import transformers  # test-only reference, installed by `make test` (requirements-test.txt)
from conftest import CONFIGS, ROPE_LLAMA3, hf_model

from nanosft.checkpoint import hf_state_dict, load_model, load_weights, point_latest, read_config, save_model
from nanosft.generate import generate
from nanosft.loss import masked_nll
from nanosft.model import ModelConfig, Transformer
from nanosft.template import ChatTemplate
from nanosft.tokenizer import Tokenizer

CHAT_TOKENS = Tokenizer.CHAT_TOKENS


def logits_of(model, idx):
    out = model(idx)
    return out.logits if hasattr(out, "logits") else out


def load_base(directory):
    """Weights only, vocabulary as in the file (load_model would add the chat markers)."""
    model = Transformer(read_config(directory))
    load_weights(directory, model)
    return model.eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_loaded_llama_matches_transformers_logits_and_greedy_generation(name, tmp_path, sp_tokenizer):
    ref = hf_model(name, tmp_path, sp_tokenizer, shard=name == "gqa_tied")
    if name == "gqa_tied":
        assert (tmp_path / "model.safetensors.index.json").exists()  # the sharded layout is covered
    ours = load_base(tmp_path)
    idx = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(logits_of(ours, idx), logits_of(ref, idx), rtol=1e-4, atol=1e-4)
        prompt = idx[0, :8].tolist()
        hf_ids = ref.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, 8:].tolist()
        full = list(prompt)
        for _ in range(32):  # without the KV cache: the whole sequence every step
            full.append(int(logits_of(ours, torch.tensor([full]))[0, -1].argmax()))
    assert full[8:] == hf_ids
    assert list(generate(ours, prompt, max_new_tokens=32)) == hf_ids  # with the KV cache


@pytest.mark.parametrize("name", ["mha_untied", "gqa_tied"])
def test_base_model_gains_the_chat_markers_with_mean_embeddings(name, tmp_path, sp_tokenizer):
    hf_model(name, tmp_path, sp_tokenizer)
    base = load_base(tmp_path)
    model, tok = load_model(tmp_path)
    assert tok.vocab_size == model.cfg.vocab_size == 320 + len(CHAT_TOKENS)
    assert [tok.id_to_piece(i) for i in range(320, 324)] == list(CHAT_TOKENS)
    for w_new, w_old in ((model.embed_tokens.weight, base.embed_tokens.weight), (model.lm_head.weight, base.lm_head.weight)):
        torch.testing.assert_close(w_new[:320], w_old)
        torch.testing.assert_close(w_new[320:], w_old.mean(0, keepdim=True).expand(4, -1))
    assert (model.lm_head.weight is model.embed_tokens.weight) == (name == "gqa_tied")


def test_spare_embedding_rows_past_the_tokenizer_are_reused_for_the_chat_markers(tmp_path, sp_tokenizer):
    hf_model("mha_untied", tmp_path, sp_tokenizer)
    cfg = json.loads((tmp_path / "config.json").read_text())
    from nanosft.safetensors import load_file, save_file
    w = load_file(tmp_path / "model.safetensors")
    for k in ("model.embed_tokens.weight", "lm_head.weight"):  # pad the matrices to 336 rows, as some checkpoints do
        w[k] = torch.cat([w[k], torch.randn(16, 64)])
    save_file(w, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "vocab_size": 336}))
    model, tok = load_model(tmp_path)
    assert tok.vocab_size == 324 and model.cfg.vocab_size == 336
    torch.testing.assert_close(model.embed_tokens.weight[320:324], w["model.embed_tokens.weight"][:320].mean(0).expand(4, -1))


def test_llama3_rope_frequencies_equal_transformers(tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from nanosft.embedding import Rotary
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # Llama 3.1's values
    ref_cfg = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0,
                                       rope_scaling=scaling, max_position_embeddings=131072)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](ref_cfg, "cpu")
    ours = Rotary(128, 500000.0, scaling).inv_freq
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)
    plain = Rotary(128, 500000.0).inv_freq
    ratio = ours / plain  # all three bands: kept (1), interpolated, slowed down (1/8)
    assert ratio.max() == 1 and ratio.min() == 1 / 8 and ((ratio < 1) & (ratio > 1 / 8)).any()


def test_bf16_checkpoint_and_old_style_rope_config_load_to_the_same_logits(tmp_path, sp_tokenizer):
    ref = hf_model("gqa_llama3_rope", tmp_path, sp_tokenizer, dtype=torch.bfloat16)
    cfg = json.loads((tmp_path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")  # write it as transformers 4 did (TinyLlama, Llama 2 downloads)
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = load_base(tmp_path)
    idx = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # ref holds the bf16-rounded weights in fp32, as our loader casts them
        torch.testing.assert_close(logits_of(ours, idx), logits_of(ref, idx), rtol=1e-4, atol=1e-4)


def test_a_tied_config_with_a_different_lm_head_in_the_file_is_refused(tmp_path, sp_tokenizer):
    hf_model("mha_untied", tmp_path, sp_tokenizer)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    with pytest.raises(ValueError, match="different lm_head.weight"):
        load_base(tmp_path)


@pytest.mark.parametrize("change, complaint", [
    ("drop v", "layers.1.self_attn.v_proj.weight is missing"),
    ("drop q", "layers.1.self_attn.q_proj.weight is missing"),  # the first part, too
    ("drop up", "layers.0.mlp.up_proj.weight is missing"),
    # k loses a row to v: the stacked matrix would have the right shape, the model would be wrong
    ("move a row", "layers.0.self_attn.k_proj.weight has 31 rows, config.json implies 32"),
])
def test_a_file_with_a_missing_or_misshapen_part_of_a_fused_matrix_is_refused_naming_it(change, complaint, tmp_path,
                                                                                        sp_tokenizer):
    from nanosft.safetensors import load_file, save_file
    hf_model("gqa_llama3_rope", tmp_path, sp_tokenizer)  # 2 kv heads of 16: k and v have 32 rows each
    state = load_file(tmp_path / "model.safetensors")
    if change == "move a row":
        k, v = "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"
        state[k], state[v] = state[k][:-1], torch.cat([state[k][-1:], state[v]])
    else:
        name = {"drop v": "layers.1.self_attn.v_proj", "drop q": "layers.1.self_attn.q_proj",
                "drop up": "layers.0.mlp.up_proj"}[change]
        del state[f"model.{name}.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=complaint):
        load_base(tmp_path)


@pytest.mark.parametrize("name", ["gqa_llama3_rope", "gqa_tied"])
def test_one_sft_step_matches_transformers_loss_and_update(name, tmp_path, sp_tokenizer):
    ref = hf_model(name, tmp_path, sp_tokenizer)
    ours = load_base(tmp_path).train()
    ref.train()
    g = torch.Generator().manual_seed(2)
    idx, targets = torch.randint(0, 320, (2, 24), generator=g), torch.randint(0, 320, (2, 24), generator=g)
    mask = (torch.rand(2, 24, generator=g) < 0.5).long()
    # ours: masked SFT loss; reference: transformers' logits scored the same way by F.cross_entropy
    s, c = masked_nll(ours(idx), targets, mask)
    loss_ours = s / c
    ref_logits = ref(idx).logits
    loss_ref = torch.nn.functional.cross_entropy(ref_logits.flatten(0, 1), targets.masked_fill(mask == 0, -100).flatten())
    torch.testing.assert_close(loss_ours, loss_ref, rtol=1e-5, atol=1e-5)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    loss_ours.backward()
    loss_ref.backward()
    # our fused q/k/v and gate/up matrices, split into Llama's, get the same gradients...
    grads = hf_state_dict({n: p.grad for n, p in ours.named_parameters()}, ours.cfg)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    assert set(grads) == set(ref_grads) - ({"lm_head.weight"} if ours.cfg.tie_embeddings else set())
    for k, g in grads.items():
        torch.testing.assert_close(g, ref_grads[k], rtol=1e-4, atol=1e-7, msg=lambda m: f"{k}: {m}")
    # ...and hold the same weights after an AdamW step. Adam's first step is about lr * sign(grad),
    # so a gradient within float noise of 0 may move by a fraction of lr: hence atol 1e-4 = lr / 100.
    opt_ours.step()
    opt_ref.step()
    ref_state = ref.state_dict()
    for k, v in hf_state_dict(ours.state_dict(), ours.cfg).items():
        torch.testing.assert_close(v, ref_state[k], rtol=1e-4, atol=1e-4, msg=lambda m: f"{k}: {m}")


def test_export_loads_in_transformers_with_the_same_logits(tmp_path, sp_tokenizer):
    torch.manual_seed(0)
    tok = Tokenizer.load(sp_tokenizer).with_control_tokens(CHAT_TOKENS)
    for name, cfg in {"tied": ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layer=2, n_head=4, n_kv_head=2),
                      "qwen2_bias": ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layer=2, n_head=4, n_kv_head=2,
                                                tie_embeddings=False, qkv_bias=True),
                      "llama3_rope": ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layer=2, n_head=4, n_kv_head=1,
                                                 rope_theta=5e5, rope_scaling=ROPE_LLAMA3, o_bias=True, qkv_bias=True)}.items():
        ours = Transformer(cfg).eval()
        with torch.no_grad():
            for n, p in ours.named_parameters():
                if n.endswith("bias"):
                    p.normal_(0, 0.1)
        out = tmp_path / name
        save_model(out, ours.state_dict(), cfg, tok)
        ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        idx = torch.randint(0, tok.vocab_size, (2, 30), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            torch.testing.assert_close(logits_of(ref, idx), logits_of(ours, idx), rtol=1e-4, atol=1e-4, msg=name)


def test_export_cli_writes_a_directory_transformers_loads(tmp_path, sp_tokenizer):
    import subprocess
    import sys
    src = tmp_path / "src"
    hf_model("gqa_tied", src, sp_tokenizer)
    hf_model("gqa_tied", tmp_path / "dst", sp_tokenizer, shard=True, seed=1)  # an older, sharded model there
    r = subprocess.run([sys.executable, "-m", "nanosft.export", str(src), str(tmp_path / "dst")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "dst").glob("model*")) == ["model.safetensors"]  # old shards gone
    ours, _ = load_model(src)
    exported, _ = load_model(tmp_path / "dst")
    assert all(torch.equal(v, exported.state_dict()[k]) for k, v in ours.state_dict().items())
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    idx = torch.randint(0, 324, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(logits_of(ref, idx), logits_of(ours, idx), rtol=1e-4, atol=1e-4)


CONVERSATIONS = [  # roles, multi-turn, Chinese, emoji, newlines, leading and doubled spaces
    [{"role": "user", "content": "the number 12 is even"}],
    [{"role": "system", "content": "You are terse. 😀"}, {"role": "user", "content": "two  spaces\n\nand a line"},
     {"role": "assistant", "content": "你好 odd\n"}, {"role": "user", "content": " is 7 odd?"}],
    [{"role": "user", "content": "我的名字是小明。"}, {"role": "assistant", "content": " 你好，小明 "},
     {"role": "user", "content": "我叫什么名字？"}],
]


@pytest.mark.parametrize("base, model_type", [("sentencepiece", "llama"), ("nanosft", "llama"), ("sentencepiece", "qwen2"),
                                              ("sentencepiece", "qwen3"), ("sentencepiece", "mistral"),
                                              ("sentencepiece", "nanosft")])
def test_saved_tokenizer_applies_the_chat_template_in_transformers_as_nanosft_does(tmp_path, sp_tokenizer, base, model_type):
    """tokenizer_config.json carries the chat template (template.py's JINJA): transformers'
    AutoTokenizer prompts the model with the very ids chat.py does, and trains on the same, whatever
    model type the directory is saved as."""
    tok = (Tokenizer.load(sp_tokenizer) if base == "sentencepiece" else
           Tokenizer.train(["the number 12 is even", "你好，小明。我叫什么名字？", "You are terse."] * 20, vocab_size=300))
    tok = tok.with_control_tokens(Tokenizer.CHAT_TOKENS)
    variant = {"llama": {}, "qwen2": dict(qkv_bias=True), "qwen3": dict(qk_norm=True), "mistral": dict(window=8),
               "nanosft": dict(pos_emb="alibi")}[model_type]
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layer=1, n_head=2, n_kv_head=1, **variant)
    save_model(tmp_path, Transformer(cfg).state_dict(), cfg, tok)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model_type
    # (for "qwen2", AutoTokenizer insists on Qwen's own byte-level tokenizer: hf_config.py's NOTE in tokenizer_config)
    loader = transformers.PreTrainedTokenizerFast if model_type == "qwen2" else transformers.AutoTokenizer
    ref = loader.from_pretrained(tmp_path)
    template = ChatTemplate(tok)
    for messages in CONVERSATIONS:
        assert ref.apply_chat_template(messages, add_generation_prompt=True)["input_ids"] == template.render_prompt(messages)
        whole = messages + [{"role": "assistant", "content": "My name is 小明."}]
        assert ref.apply_chat_template(whole)["input_ids"] == template.render(whole)[0]
    assert ref("the number 7")["input_ids"] == [tok.bos_id] + tok.encode("the number 7")  # <s> first, as Llama
    assert (ref.bos_token, ref.eos_token) == ("<s>", "</s>") and len(ref) == tok.vocab_size
    assert ref.pad_token_id == template.pad  # <pad>, or <unk> where the tokenizer has none, as nanosft pads
    with pytest.raises(Exception, match="roles are system, user and assistant, not tool"):
        ref.apply_chat_template([{"role": "tool", "content": "42"}])


def test_saved_run_loads_back_to_identical_logits_with_tied_weights_shared(tmp_path):
    torch.manual_seed(0)
    tok = Tokenizer.train(["hello world", "how are you", "你好"] * 10, vocab_size=300)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layer=2, n_head=2, n_kv_head=1)).eval()
    run = tmp_path / "runs" / "a"
    save_model(run, model.state_dict(), model.cfg, tok)
    loaded, tok2 = load_model(run)
    idx = torch.tensor([tok.encode("hello 你好 world")])
    torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert tok2.encode("how are you") == tok.encode("how are you") and tok2.vocab_size == tok.vocab_size
    from nanosft.safetensors import load_file
    assert "lm_head.weight" not in load_file(run / "model.safetensors")  # the tied matrix is stored once


@pytest.mark.parametrize("key, value, complaint", [
    ("hidden_act", "gelu", "hidden_act='gelu' is not supported"),
    ("mlp_bias", True, "mlp_bias=True is not supported"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}, "rope scaling type 'yarn' is not supported"),
    ("some_new_knob", 3, "unsupported config keys ['some_new_knob']"),
    ("model_type", "gpt2", "model_type 'gpt2' is not supported"),
    ("pos_emb", "alibi", "unsupported config keys ['pos_emb']"),  # a nanosft key in a Llama file
    # values of the wrong kind: named, not a traceback from deep inside
    ("hidden_size", "64", "hidden_size must be a whole number of at least 1, not '64'"),
    ("hidden_size", None, "hidden_size must be a whole number of at least 1, not None"),
    ("num_attention_heads", 0, "num_attention_heads must be a whole number of at least 1, not 0"),
    ("max_position_embeddings", 0, "max_position_embeddings must be a whole number of at least 1"),
    ("rope_theta", "abc", "rope_theta must be a positive number, not 'abc'"),
    ("rope_scaling", [1], "rope_scaling must be an object"),
    ("rope_theta", None, "rope_theta must be a positive number, not None"),  # null is no default for these
    ("rms_norm_eps", float("inf"), "rms_norm_eps must be a positive number, not inf"),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5, "factor": "x", "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, "rope scaling factor must be"),
])
def test_unsupported_config_fails_loudly_naming_the_key(tmp_path, sp_tokenizer, key, value, complaint):
    hf_model("gqa_tied", tmp_path, sp_tokenizer)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json") as e:
        read_config(tmp_path)
    assert complaint in str(e.value)


def test_config_that_is_not_an_object_or_lacks_a_size_is_refused(tmp_path, sp_tokenizer):
    hf_model("gqa_tied", tmp_path, sp_tokenizer)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for bad, complaint in ((json.dumps([cfg]), "expected a JSON object, got list"),
                           (json.dumps({k: v for k, v in cfg.items() if k != "hidden_size"}), "hidden_size is missing")):
        (tmp_path / "config.json").write_text(bad)
        with pytest.raises(ValueError, match=f"config.json: {complaint}"):
            read_config(tmp_path)


def test_llama_ignores_sliding_window_and_mistral_without_the_key_uses_its_4096_default(tmp_path, sp_tokenizer):
    hf_model("gqa_tied", tmp_path, sp_tokenizer)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "sliding_window": 16}))
    assert read_config(tmp_path).window == 0  # llama has no sliding window: the key changes nothing
    mistral = {**cfg, "model_type": "mistral", "max_position_embeddings": 8192}
    (tmp_path / "config.json").write_text(json.dumps(mistral))
    assert read_config(tmp_path).window == 4096
    (tmp_path / "config.json").write_text(json.dumps({**mistral, "sliding_window": None}))
    assert read_config(tmp_path).window == 0


@pytest.mark.parametrize("variant, model_type", [
    (dict(qk_norm=True), "qwen3"), (dict(window=8), "mistral"), (dict(pos_emb="alibi"), "nanosft"),
    (dict(pos_emb="none", window=4), "nanosft"), (dict(softcap=5.0, qk_norm=True), "nanosft"),
    (dict(attn_impl="manual"), "llama")])
def test_attention_variants_save_as_the_architecture_that_computes_them_and_load_back(
        tmp_path, sp_tokenizer, variant, model_type):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=324, dim=32, n_layer=2, n_head=4, n_kv_head=2, **variant)).eval()
    with torch.no_grad():  # random norm scales: swapped q_norm/k_norm names would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    tok = Tokenizer.load(str(sp_tokenizer)).with_control_tokens(CHAT_TOKENS)
    save_model(tmp_path, model.state_dict(), model.cfg, tok)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["model_type"] == model_type
    loaded = load_base(tmp_path)
    fields = {k: v for k, v in variant.items() if k != "attn_impl"}  # manual vs sdpa: how, not what
    assert {k: getattr(loaded.cfg, k) for k in fields} == fields
    idx = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loaded(idx), model(idx))
    if model_type != "nanosft":  # transformers computes the same
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(ref(idx).logits, model(idx), rtol=1e-4, atol=1e-4)
    else:
        with pytest.raises(ValueError):  # transformers refuses the type instead of building a Llama
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_a_broken_tokenizer_json_in_a_model_directory_is_named(tmp_path, sp_tokenizer):
    hf_model("gqa_tied", tmp_path, sp_tokenizer)
    os.remove(tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=f"{tmp_path / 'tokenizer.json'}: not a tokenizer.json as Hugging Face writes it"):
        load_model(tmp_path)


def test_latest_points_at_the_newest_run(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        point_latest(tmp_path / name)
    assert os.path.realpath(tmp_path / "latest") == str(tmp_path / "b")
    point_latest(tmp_path / "latest")  # --out runs/latest: the run it leads to, not a link to itself
    assert os.readlink(tmp_path / "latest") == "b"
    (tmp_path / "scratch" / "c").mkdir(parents=True)
    os.symlink(tmp_path / "scratch" / "c", tmp_path / "c")  # a run folder that is a link to elsewhere
    point_latest(tmp_path / "c")
    assert os.readlink(tmp_path / "latest") == "c" and not os.path.lexists(tmp_path / "scratch" / "latest")


def test_latest_that_is_not_a_link_is_left_alone(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "latest").write_text("my notes")
    point_latest(tmp_path / "a")
    assert (tmp_path / "latest").read_text() == "my notes" and "left as it is" in capsys.readouterr().err
    (tmp_path / "other" / "latest").mkdir(parents=True)  # a run folder named latest
    point_latest(tmp_path / "other" / "latest")
    assert not os.path.islink(tmp_path / "other" / "latest")
