"""
Hugging Face's config.json, mapped onto ModelConfig and back: what lets every nanosft run be a
Hugging Face model directory and every Llama-family directory load here (checkpoint.py reads and
writes the directories; this file only translates their configs).

    config_from_hf(json dict) -> ModelConfig             read key by key; a key nanosft does not
    config_to_hf(ModelConfig) -> json dict               implement fails loudly (a silently ignored
    tokenizer_config(tok, cfg, template) -> json dict    key would mean a silently different model)

Model types: llama, qwen2 (q/k/v biases), qwen3 (QK-norm), mistral (sliding window), and "nanosft"
for attention variants no Hugging Face architecture computes (ALiBi, soft-capping, ...), which
transformers refuses to load rather than build a model that computes something else.
"""

import math

from nanosft.model import ModelConfig

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "nanosft")
# Llama's attention. A model whose attention differs (attention.py's variants) is saved as the
# Hugging Face type that computes the same (Qwen3: QK-norm; Mistral: a sliding window), or else as
# model_type "nanosft": transformers refuses to load that, where a Llama config would have it build
# a model that silently computes something else. nanosft reads its keys back.
LLAMA_ATTENTION = {"window": 0, "pos_emb": "rope", "qk_norm": False, "softcap": 0.0}
STANDARD_IMPLS = ("sdpa", "manual")  # two ways to compute the same attention; any other is a variant
NANOSFT_KEYS = {"pos_emb", "qk_norm", "attn_logit_softcapping", "attn_impl", "qkv_bias", "o_bias"}
# keys that describe the file, training or generation defaults, not the forward pass
IGNORED = {"architectures", "model_type", "dtype", "torch_dtype", "transformers_version", "_name_or_path",
           "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache",
           "attention_dropout", "pretraining_tp", "max_window_layers", "tokenizer_class", "return_dict",
           "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "id2label",
           "label2id", "num_labels", "problem_type", "layer_types", "embd_pdrop", "resid_pdrop"}
DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768, "qwen3": 32768, "nanosft": 2048}
# keys whose only supported value is the one given (None: absent or null)
REQUIRED = {"hidden_act": "silu", "mlp_bias": False, "use_sliding_window": False, "quantization_config": None}


def _rope(hf, where):
    """-> (rope_theta, rope_scaling or None) from either config style: transformers 5 writes
    rope_parameters, older versions rope_theta + rope_scaling."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    theta = _positive(theta, f"{where}: rope_theta")
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise ValueError(f"{where}: rope scaling type {kind!r} is not supported (only 'default' and 'llama3')")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    if any(k not in params for k in keys):
        raise ValueError(f"{where}: llama3 rope scaling needs {', '.join(keys)}; got {sorted(params)}")
    return float(theta), {"rope_type": "llama3", **{k: _positive(params[k], f"{where}: rope scaling {k}") for k in keys}}


# what kind of value each number in a config must be: sizes are whole numbers; in SIZES required
# and at least 1, in DEFAULTED_SIZES absent, null or 0 for "the default"; max_position_embeddings
# and the REALS may be absent (the default), but are never null
SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
DEFAULTED_SIZES = ("num_key_value_heads", "head_dim", "sliding_window")
REALS = ("rms_norm_eps", "rope_theta")


def _positive(v, what):
    """v if it is a positive, finite number, else a ValueError naming `what`."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
        raise ValueError(f"{what} must be a positive number, not {v!r}")
    return v


def _check_types(hf, where):
    """A clear error for a config.json whose values would otherwise fail deep inside (a traceback)."""
    if not isinstance(hf, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(hf).__name__}")
    for key in SIZES + DEFAULTED_SIZES + ("max_position_embeddings",) + REALS:
        if key not in hf:
            if key in SIZES:
                raise ValueError(f"{where}: {key} is missing")
            continue
        v = hf[key]
        if v is None and key in DEFAULTED_SIZES:
            continue
        if key in REALS:
            _positive(v, f"{where}: {key}")
            continue
        least = 0 if key in DEFAULTED_SIZES else 1
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ValueError(f"{where}: {key} must be a whole number of at least {least}, not {v!r}")
    for key in ("rope_scaling", "rope_parameters"):
        if not isinstance(hf.get(key) or {}, dict):
            raise ValueError(f"{where}: {key} must be an object, not {hf[key]!r}")


def config_from_hf(hf, where="config.json"):
    _check_types(hf, where)
    if hf.get("model_type") not in MODEL_TYPES:
        raise ValueError(f"{where}: model_type {hf.get('model_type')!r} is not supported "
                         f"(nanosft loads {', '.join(MODEL_TYPES)})")
    mapped = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps",
              "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters", "attention_bias",
              "sliding_window"} | (NANOSFT_KEYS if hf["model_type"] == "nanosft" else set())
    unknown = sorted(set(hf) - mapped - IGNORED - set(REQUIRED))
    if unknown:
        raise ValueError(f"{where}: unsupported config keys {unknown}; nanosft would not build the same model")
    for key, want in REQUIRED.items():
        if hf.get(key, want) != want:
            raise ValueError(f"{where}: {key}={hf[key]!r} is not supported (only {want!r})")
    # an absent key means the defaults of that model type's config class in transformers
    max_pos = hf.get("max_position_embeddings", DEFAULT_MAX_POSITIONS[hf["model_type"]])
    window = hf.get("sliding_window", 4096 if hf["model_type"] == "mistral" else None) or 0
    if hf["model_type"] in ("llama", "qwen2", "qwen3") or window >= max_pos:
        window = 0  # Llama has none; Qwen's needs use_sliding_window; one as long as the context is none
    theta, scaling = _rope(hf, where)
    qwen2 = hf["model_type"] == "qwen2"  # Qwen2: biases on q/k/v only
    bias = hf.get("attention_bias", False)
    variant = dict(qk_norm=True) if hf["model_type"] == "qwen3" else {}
    if hf["model_type"] == "nanosft":
        variant = dict(pos_emb=hf.get("pos_emb", "rope"), qk_norm=hf.get("qk_norm", False),
                       softcap=hf.get("attn_logit_softcapping") or 0.0, attn_impl=hf.get("attn_impl", "sdpa"))
        bias = False
    n_head = hf["num_attention_heads"]
    default_head_dim = 128 if hf["model_type"] == "qwen3" else hf["hidden_size"] // n_head  # transformers' defaults
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layer=hf["num_hidden_layers"], n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head, ffn_hidden=hf["intermediate_size"],
            max_seq_len=max_pos, head_dim=hf.get("head_dim") or default_head_dim,
            rope_theta=theta, rope_scaling=scaling, norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=hf.get("tie_word_embeddings", False),  # transformers' default: untied
            qkv_bias=hf.get("qkv_bias", qwen2 or bias), o_bias=hf.get("o_bias", not qwen2 and bias),
            window=window, **variant)
    except ValueError as e:  # e.g. an attention variant this copy of attention.py does not have
        raise ValueError(f"{where}: {e}") from None


def hf_model_type(cfg: ModelConfig):
    """The Hugging Face model type that computes what cfg describes ("nanosft" when none does)."""
    differs = {k for k, v in LLAMA_ATTENTION.items() if getattr(cfg, k) != v}
    if cfg.attn_impl not in STANDARD_IMPLS:
        differs.add("attn_impl")
    if not differs:
        return "qwen2" if cfg.qkv_bias and not cfg.o_bias else "llama"  # Qwen2: biases on q/k/v only
    if differs == {"qk_norm"} and cfg.qkv_bias == cfg.o_bias:
        return "qwen3"
    if differs == {"window"} and not cfg.qkv_bias and not cfg.o_bias:
        return "mistral"
    return "nanosft"


ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "mistral": "MistralForCausalLM", "nanosft": "NanosftForCausalLM"}


def config_to_hf(cfg: ModelConfig, bos_id=None, eos_id=None, dtype="float32"):
    if cfg.qkv_bias != cfg.o_bias and not cfg.qkv_bias:
        raise ValueError("a bias on the output projection alone has no Hugging Face architecture")
    kind = hf_model_type(cfg)
    hf = {"architectures": [ARCHITECTURES[kind]], "model_type": kind,
          "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_hidden,
          "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
          "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "hidden_act": "silu",
          "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
          "rope_theta": cfg.rope_theta, **({"rope_scaling": cfg.rope_scaling} if cfg.rope_scaling else {}),
          "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": dtype,
          "bos_token_id": bos_id, "eos_token_id": eos_id}
    if kind in ("llama", "qwen3"):
        hf.update(attention_bias=cfg.qkv_bias)
    if kind == "llama":
        hf.update(mlp_bias=False)
    if kind == "mistral":
        hf.update(sliding_window=cfg.window)
    if kind == "nanosft":
        hf.update(qkv_bias=cfg.qkv_bias, o_bias=cfg.o_bias, sliding_window=cfg.window or None,
                  pos_emb=cfg.pos_emb, qk_norm=cfg.qk_norm, attn_logit_softcapping=cfg.softcap or None)
        if cfg.attn_impl not in STANDARD_IMPLS:
            hf["attn_impl"] = cfg.attn_impl  # the attention function itself, a name in attention.ATTEND
    return hf


def tokenizer_config(tok, cfg: ModelConfig, template):
    """What Hugging Face tokenizers read beside tokenizer.model or tokenizer.json: the special tokens,
    whether encoding text starts with <s> (as in Llama), and the chat template (template.jinja)."""
    special = {name: tok.id_to_piece(i) for name, i in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id),
                                                         ("unk_token", tok.unk_id), ("pad_token", template.pad)) if i >= 0}
    out = {**special, "add_bos_token": tok.bos_id >= 0, "add_eos_token": False, "model_max_length": cfg.max_seq_len,
           "chat_template": template.jinja}
    # A tokenizer.json is read as it is by the generic class (a model type's own class may rebuild it).
    # Without a "tokenizer_class", transformers builds its tokenizer from tokenizer.model and splits
    # text as sentencepiece does ("LlamaTokenizer" would not, for text that starts with a space after
    # a special token). Except that for Qwen model types it picks Qwen's byte-level tokenizer: there,
    # name the generic class, which also reads tokenizer.model. NOTE: transformers 5 overrides that
    # for "qwen2" (q/k/v biases only); load such a tokenizer with PreTrainedTokenizerFast itself.
    if tok.FILE == "tokenizer.json" or hf_model_type(cfg) in ("qwen2", "qwen3"):
        out["tokenizer_class"] = "PreTrainedTokenizerFast"
    return out
