"""
A model on disk. Every nanosft run directory is a Hugging Face model directory, and every
Llama-family Hugging Face directory can be loaded here: one format in and out.

    runs/<name>/
      config.json         Hugging Face config: LlamaForCausalLM, or Qwen2 (q/k/v biases), Qwen3
                          (QK-norm), Mistral (sliding window), or model_type "nanosft" for
                          attention variants no Hugging Face architecture computes
      model.safetensors   the weights (or shards + model.safetensors.index.json when loading)
      tokenizer.model     SentencePiece format, see tokenizer.py
      tokenizer_config.json  special tokens and the chat template, for Hugging Face tokenizers
      generation_config.json  the end tokens
      ds_config.json      the DeepSpeed config the run used          (train.py)
      monitor/            DeepSpeed's CSV monitor, one row per step    (train.py)
      metrics.json        validation loss/perplexity, exact match, speed (train.py)
    runs/latest -> <name>   the newest run

nanosft's parameter names are Llama's without the "model." prefix, except that q/k/v and gate/up
are one matrix each here (qkv_proj, gate_up_proj): the mapping is that prefix, splitting (saving)
or stacking (loading) those matrices, and the LM head, absent from the file when it is tied to the
embedding. A config key we do not implement fails loudly: a silently ignored key would mean a
silently different model. Weights are read with the hand-written safetensors reader (no pickle, so
opening a checkpoint runs no code).
train.py writes runs and loads `--init-from`; chat.py, evaluate.py and export.py load.
"""

import json
import math
import os
import sys

import torch

from nanosft.model import ModelConfig, Transformer
from nanosft.safetensors import load_sharded, save_file
from nanosft.template import JINJA
from nanosft.tokenizer import Tokenizer


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
           "label2id", "layer_types", "embd_pdrop", "resid_pdrop"}
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


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def read_json(path):
    """What a JSON file holds; a ValueError naming the file and where, when it is not JSON or not UTF-8."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return json.loads(data.decode("utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: invalid UTF-8 ({e.reason} at byte {e.start})") from None


# nanosft computes these projections with one matrix each; Llama files store the parts, in this order
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def fused_rows(cfg: ModelConfig):
    """Rows of each part of the fused matrices, in stacking order."""
    return {"self_attn.qkv_proj": [cfg.n_head * cfg.head_dim] + [cfg.n_kv_head * cfg.head_dim] * 2,
            "mlp.gate_up_proj": [cfg.ffn_hidden] * 2}


def split_fused(state, cfg: ModelConfig):
    """nanosft's fused q/k/v and gate/up matrices (and biases) -> Llama's separate ones."""
    rows = fused_rows(cfg)
    out = {}
    for name, t in state.items():
        fused = next((f for f in FUSED if f".{f}." in name), None)
        if fused is None:
            out[name] = t
            continue
        for part, piece in zip(FUSED[fused], t.split(rows[fused])):
            out[name.replace(fused, part)] = piece
    return out


def join_fused(state, cfg: ModelConfig):
    """The inverse of split_fused: Llama's q/k/v and gate/up matrices stacked into nanosft's. Each
    part must be there and have its own number of rows (a wrong k and v that add up to the right
    total would otherwise stack into a matrix of the right shape)."""
    out = dict(state)
    rows = fused_rows(cfg)
    for fused, parts in FUSED.items():
        # "layers.3.self_attn.q_proj.weight" -> "layers.3.self_attn.{}.weight", from any part present
        groups = {name.replace(p, "{}") for name in state for p in parts if f".{p}." in name}
        for pattern in sorted(groups):
            names = [pattern.format(p) for p in parts]
            missing = [n for n in names if n not in state]
            if missing:
                present = ", ".join(n for n in names if n in state)
                raise ValueError(f"{missing[0]} is missing (it belongs with {present})")
            for n, want in zip(names, rows[fused]):
                if state[n].shape[0] != want:
                    raise ValueError(f"{n} has {state[n].shape[0]} rows, config.json implies {want}")
            out[pattern.format(fused)] = torch.cat([out.pop(n) for n in names])
    return out


def hf_state_dict(state, cfg: ModelConfig):
    """nanosft's state dict -> LlamaForCausalLM's names and matrices (the tied LM head left out)."""
    state = {("" if k == "lm_head.weight" else "model.") + k: v for k, v in split_fused(state, cfg).items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # stored once, as the embedding; the loader re-ties it
    return state


def save_model(directory, state, cfg: ModelConfig, tok: Tokenizer):
    """Write config.json, model.safetensors and the tokenizer files: a directory that transformers'
    AutoModelForCausalLM / AutoTokenizer.from_pretrained and this module's load_model all read."""
    os.makedirs(directory, exist_ok=True)
    state = hf_state_dict(state, cfg)
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})  # atomic
    remove_shards(directory)
    # generation ends at the chat template's <|end|> as well as at </s>
    eos = [tok.token_id("<|end|>")] + ([tok.eos_id] if tok.eos_id >= 0 else [])
    bos = tok.bos_id if tok.bos_id >= 0 else None
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    write_json(os.path.join(directory, "config.json"), config_to_hf(cfg, bos, eos, dtype))
    write_json(os.path.join(directory, "generation_config.json"), {"bos_token_id": bos, "eos_token_id": eos})
    tok.save(os.path.join(directory, "tokenizer.model"))
    write_json(os.path.join(directory, "tokenizer_config.json"), tokenizer_config(tok, cfg))


def remove_shards(directory):
    """A sharded checkpoint saved here before (an index and the shards it names) is stale next to
    the model.safetensors just written: other tools could read either. Remove it."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if not os.path.exists(index):
        return
    try:
        with open(index, encoding="utf-8") as f:
            shards = set(json.load(f).get("weight_map", {}).values())
    except (ValueError, AttributeError):
        shards = set()  # not an index we can read: the index alone goes
    for shard in shards:
        path = os.path.join(directory, os.path.basename(str(shard)))
        if path.endswith(".safetensors") and os.path.basename(path) != "model.safetensors" and os.path.isfile(path):
            os.remove(path)
    os.remove(index)


def tokenizer_config(tok: Tokenizer, cfg: ModelConfig):
    """What Hugging Face tokenizers read beside tokenizer.model: the special tokens, that encoding
    text starts with <s> (as in Llama), and the chat template."""
    pad = tok.pad_id if tok.pad_id >= 0 else tok.unk_id  # what the chat template pads with
    special = {name: tok.id_to_piece(i) for name, i in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id),
                                                         ("unk_token", tok.unk_id), ("pad_token", pad)) if i >= 0}
    out = {**special, "add_bos_token": tok.bos_id >= 0, "add_eos_token": False, "model_max_length": cfg.max_seq_len,
           "chat_template": JINJA}
    # Without a "tokenizer_class", transformers builds its tokenizer from tokenizer.model and splits
    # text as sentencepiece does ("LlamaTokenizer" would not, for text that starts with a space after
    # a special token). Except that for Qwen model types it picks Qwen's byte-level tokenizer: there,
    # name the generic class, which also reads tokenizer.model. NOTE: transformers 5 overrides that
    # for "qwen2" (q/k/v biases only); load such a tokenizer with PreTrainedTokenizerFast itself.
    if hf_model_type(cfg) in ("qwen2", "qwen3"):
        out["tokenizer_class"] = "PreTrainedTokenizerFast"
    return out


def read_config(directory):
    path = os.path.join(directory, "config.json")
    return config_from_hf(read_json(path), path)


def load_weights(directory, model):
    """Copy a checkpoint's tensors into `model` (cast to its dtype); names must match exactly."""
    state = {}
    for name, t in load_sharded(directory).items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer older transformers versions saved; we compute it from the config
        state[name.removeprefix("model.")] = t
    if model.cfg.tie_embeddings and "lm_head.weight" in state:
        if not torch.equal(state.pop("lm_head.weight"), state.get("embed_tokens.weight")):
            raise ValueError(f"{directory}: config.json ties the LM head to the embedding, "
                             "but the file holds a different lm_head.weight")
    try:
        state = join_fused(state, model.cfg)
    except ValueError as e:  # a part of a fused matrix missing or of the wrong size
        raise ValueError(f"{directory}: {e}") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{directory}: weights do not match config.json: {e}") from None
    if model.cfg.tie_embeddings:
        missing = [m for m in missing if m != "lm_head.weight"]  # the tied head is the embedding
    if missing or unexpected:
        raise ValueError(f"{directory}: weights do not match config.json: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def load_tokenizer(directory):
    """The directory's SentencePiece tokenizer, with the chat template's control tokens added if
    the model was not trained with them (a base model)."""
    path = os.path.join(directory, "tokenizer.model")
    if not os.path.exists(path):
        if os.path.exists(os.path.join(directory, "tokenizer.json")):
            raise ValueError(f"{directory}: only a tokenizer.json (byte-level BPE, as in Llama 3, Qwen2 or "
                             "SmolLM) is there; nanosft reads SentencePiece tokenizer.model files")
        raise FileNotFoundError(f"{path} not found")
    return Tokenizer.load(path)


def load_model(directory, device="cpu", attn_impl="sdpa"):
    """A run directory or a Hugging Face directory -> (model in eval mode, tokenizer). A base
    model's tokenizer gains the chat markers, and their embedding rows start at the mean."""
    if not os.path.exists(os.path.join(directory, "config.json")):
        raise FileNotFoundError(f"{os.path.join(directory, 'config.json')} not found")
    cfg = read_config(directory)
    if cfg.attn_impl in STANDARD_IMPLS:  # a variant's own function stays
        cfg.attn_impl = attn_impl
    base = load_tokenizer(directory)
    tok = base.with_control_tokens(Tokenizer.CHAT_TOKENS)
    model = Transformer(cfg)
    load_weights(directory, model)
    if tok.vocab_size > base.vocab_size:
        model.add_token_rows(base.vocab_size, tok.vocab_size)
    return model.to(device).eval(), tok


def point_latest(run_dir):
    """Make runs/latest (next to run_dir) point at run_dir. run_dir may be runs/latest itself
    (`--out runs/latest --resume`): the link then keeps naming the run it leads to. A `latest` that is
    not a link is somebody's file or folder: it is left alone, with a warning."""
    parent, name = os.path.split(os.path.abspath(run_dir))
    link = os.path.join(parent, "latest")
    if name == "latest" and os.path.islink(link):  # --out runs/latest: the link already leads to the run
        return
    if os.path.lexists(link) and not os.path.islink(link):
        print(f"warning: {link} is not a link nanosft made; left as it is", file=sys.stderr)
        return
    tmp = link + ".tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(name, tmp)
    os.replace(tmp, link)
