"""
A model on disk. Every nanosft run directory is a Hugging Face model directory, and every
Llama-family Hugging Face directory can be loaded here: one format in and out.

    runs/<name>/
      config.json         Hugging Face config: LlamaForCausalLM, or Qwen2 (q/k/v biases), Qwen3
                          (QK-norm), Mistral (sliding window), or model_type "nanosft" for
                          attention variants no Hugging Face architecture computes
      model.safetensors   the weights (or shards + model.safetensors.index.json when loading)
      tokenizer.model     SentencePiece format (tokenizer.py), or tokenizer.json: byte-level BPE (bpe.py)
      tokenizer_config.json  special tokens and the chat template (its format: template.py)
      generation_config.json  the end tokens
      ds_config.json      the DeepSpeed config the run used          (train.py)
      monitor/            DeepSpeed's CSV monitor, one row per step    (train.py)
      metrics.json        validation loss/perplexity, exact match, speed (train.py)
    runs/latest -> <name>   the newest run

config.json is translated by hf_config.py. nanosft's parameter names are Llama's without the
"model." prefix, except that q/k/v and gate/up are one matrix each here (qkv_proj, gate_up_proj):
the mapping is that prefix, splitting (saving) or stacking (loading) those matrices, and the LM
head, absent from the file when it is tied to the embedding. Weights are read with the
hand-written safetensors reader (no pickle, so opening a checkpoint runs no code). A quantized
model (quantize.py) is saved and loaded the same way, with its qweight and scales for each weight
and a "quantization" entry in config.json, which only nanosft reads.
train.py writes runs and loads `--init-from`; chat.py, evaluate.py and export.py load.
"""

import json
import os
import sys

import torch

from nanosft.files import read_json, write_json
from nanosft.hf_config import STANDARD_IMPLS, config_from_hf, config_to_hf, tokenizer_config
from nanosft.model import ModelConfig, Transformer
from nanosft.quantize import QUANTIZE, quantize_model
from nanosft.reward import RewardModel
from nanosft.safetensors import load_sharded, save_file
from nanosft.template import ChatTemplate, with_markers
from nanosft.tokenizer_dir import load_tokenizer


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
    """nanosft's state dict -> LlamaForCausalLM's names and matrices (the tied LM head left out).
    A quantized model's qweight and scales (quantize.py) are split and named the same way."""
    state = {("" if k.startswith("lm_head.") else "model.") + k: v for k, v in split_fused(state, cfg).items()}
    if cfg.tie_embeddings:  # stored once, as the embedding; the loader re-ties it
        state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
    return state


def save_model(directory, state, cfg: ModelConfig, tok, quantization=None):
    """Write config.json, model.safetensors and the tokenizer files: a directory that transformers'
    AutoModelForCausalLM / AutoTokenizer.from_pretrained and this module's load_model all read.
    tok.chat_template (the format the model was trained in) goes into tokenizer_config.json.
    A quantized model's state (quantize.py's qweight and scales) is saved with its `quantization`
    ({"method", "bits", "group_size"}) in config.json, for load_model alone (transformers reads
    only its own formats).
    A reward model's state (reward.py: "model." + the decoder's names, and "score.weight") is saved
    for AutoModelForSequenceClassification: the decoder, the score head, one label, and the pad token,
    by which transformers finds each row's last real token, where the score is read (rows that end
    at a reply's end token, right-padded, score as nanosft scores them)."""
    score = state.get("score.weight")
    if score is not None:
        state = {k.removeprefix("model."): v for k, v in state.items() if k != "score.weight"}
    os.makedirs(directory, exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # an earlier LoRA run's adapter (train.py
        if os.path.exists(os.path.join(directory, name)):              # writes this run's after the model)
            os.remove(os.path.join(directory, name))
    state = hf_state_dict(state, cfg)
    if score is not None:  # (a reward model has no LM head: the score is its head)
        state["score.weight"] = score
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})  # atomic
    remove_shards(directory)
    # generation ends at the chat format's end of turn as well as at the end of text
    template = ChatTemplate(tok)
    eos = [template.end] + ([tok.eos_id] if tok.eos_id >= 0 and tok.eos_id != template.end else [])
    bos = tok.bos_id if tok.bos_id >= 0 else None
    dtype = str(next(t.dtype for t in state.values() if t.is_floating_point())).removeprefix("torch.")
    hf = config_to_hf(cfg, bos, eos, dtype)
    if quantization:
        hf["quantization"] = quantization
    if score is not None:
        # transformers reads each row's score at its last token that is not padding: the pad token
        # must not be the end token the score belongs to (Llama 3's and SmolLM2's pad would be)
        pad = next(i for i in (template.pad, tok.eos_id, tok.bos_id, tok.unk_id, 0) if i >= 0 and i != template.end)
        hf.update(architectures=[hf["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")],
                  num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, pad_token_id=pad)
    write_json(os.path.join(directory, "config.json"), hf)
    write_json(os.path.join(directory, "generation_config.json"), {"bos_token_id": bos, "eos_token_id": eos})
    save_tokenizer(directory, tok, cfg)


def save_tokenizer(directory, tok, cfg: ModelConfig):
    """tokenizer.model or tokenizer.json, and tokenizer_config.json with the chat template."""
    for name in ("tokenizer.model", "tokenizer.json", "chat_template.jinja"):  # another kind's file would be read instead
        if name != tok.FILE and os.path.exists(os.path.join(directory, name)):
            os.remove(os.path.join(directory, name))
    tok.save(os.path.join(directory, tok.FILE))
    write_json(os.path.join(directory, "tokenizer_config.json"), tokenizer_config(tok, cfg, ChatTemplate(tok)))


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


def read_config(directory):
    path = os.path.join(directory, "config.json")
    return config_from_hf(read_json(path), path)


def load_weights(directory, model, skip=()):
    """Copy a checkpoint's tensors into `model` (cast to its dtype); names must match exactly, except
    those in `skip`."""
    state = {}
    for name, t in load_sharded(directory).items():
        if name.endswith("rotary_emb.inv_freq") or name in skip:
            continue  # (inv_freq: a buffer older transformers versions saved; we compute it from the config)
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
    if model.cfg.tie_embeddings:  # the tied head is the embedding (lm_head.weight, or its qweight and scales)
        missing = [m for m in missing if not m.startswith("lm_head.")]
    if missing or unexpected:
        raise ValueError(f"{directory}: weights do not match config.json: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def load_model(directory, device="cpu", attn_impl="sdpa"):
    """A run directory or a Hugging Face directory -> (model in eval mode, tokenizer). A base
    model's tokenizer gains the chat markers, and their embedding rows start at the mean. A
    directory saved quantized (config.json's "quantization") loads as the same quantized model."""
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found")
    hf = read_json(path)
    quantized = hf.pop("quantization", None) if isinstance(hf, dict) else None
    cfg = config_from_hf(hf, path)
    if any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or []):
        raise ValueError(f"{directory} holds a reward model (a sequence classifier): it scores replies, it does not "
                         "write them; load it with checkpoint.load_reward_model")
    if cfg.attn_impl in STANDARD_IMPLS:  # a variant's own function stays
        cfg.attn_impl = attn_impl
    tok = with_markers(load_tokenizer(directory))
    model = Transformer(cfg)
    if quantized:  # the quantized layers first (of the random weights), then the file's tensors into them
        quantize_model(model, quantization_method(quantized, path))
    load_weights(directory, model)
    if tok.vocab_size > tok.base_size:  # chat markers added to a base model's vocabulary
        model.add_token_rows(tok.base_size, tok.vocab_size)
    return model.to(device).eval(), tok


def quantization_method(entry, path):
    """config.json's "quantization" entry -> its method, checked."""
    method = entry.get("method") if isinstance(entry, dict) else None
    if method not in QUANTIZE:
        raise ValueError(f"{path}: quantization {entry!r} names no method nanosft has ({', '.join(QUANTIZE)})")
    return method


def load_reward_model(directory, device="cpu"):
    """A reward model saved by train.py --stage reward (or any Llama-family sequence classifier with
    one label) -> (RewardModel in eval mode, tokenizer)."""
    path = os.path.join(directory, "config.json")
    hf = read_json(path)
    if hf.get("num_labels", len(hf.get("id2label") or {})) != 1:
        raise ValueError(f"{path}: not a reward model (a sequence classifier with num_labels 1)")
    cfg = config_from_hf(hf, path)
    tok = with_markers(load_tokenizer(directory))
    rm = RewardModel(Transformer(cfg))
    state = load_sharded(directory)
    if "score.weight" not in state:
        raise ValueError(f"{directory}: no score.weight: not a reward model")
    rm.score.weight.data.copy_(state["score.weight"].float())
    load_weights(directory, rm.model, skip=("score.weight",))
    return rm.to(device).eval(), tok


def describe_path(path):
    """path, and the run it leads to when it is a link (runs/latest): what a command really loads."""
    return f"{path} (-> {os.path.realpath(path)})" if os.path.islink(os.path.normpath(path)) else str(path)


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
    tmp = link + ".tmp"  # (a link, not a file: files.atomic_write cannot make it)
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(name, tmp)
    os.replace(tmp, link)
