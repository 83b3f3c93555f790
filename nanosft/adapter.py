"""
LoRA adapters on disk, in PEFT's format: what `PeftModel.from_pretrained(base, DIR)` loads onto the
transformers model of the same base, and what nanosft loads from an adapter PEFT saved.

    runs/<name>/
      adapter_config.json          {"peft_type": "LORA", "r", "lora_alpha", "target_modules", ...}
      adapter_model.safetensors    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" (r, in)
                                   "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight" (out, r)

    save_adapter(directory, adapters, model, base)   adapters: full_state_dict's, lora.py's names
    load_adapter(directory, model)                   adapters added to model (lora.add_lora), unmerged

nanosft's adapter on the q rows of its fused qkv_proj is PEFT's adapter on q_proj (lora.py), so the
mapping is only a renaming. Anything in an adapter_config.json that changes the maths and that
lora.py does not do (rsLoRA's scale, DoRA, per-layer ranks, bias training, extra saved modules) is
refused by name rather than loaded as something else.
"""

import os

from nanosft.files import read_json, write_json
from nanosft.lora import PROJECTIONS, add_lora, lora_modules
from nanosft.safetensors import load_file, save_file

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model.model."  # PeftModel -> LlamaForCausalLM -> LlamaModel
# settings of PEFT's LoraConfig that must keep their default value here
DEFAULTS = {"use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None,
            "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}


def peft_key(name):
    """nanosft's "layers.0.self_attn.qkv_proj.lora_A.q_proj" -> PEFT's
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"."""
    module, kind_proj = name.split(".lora_")
    kind, proj = kind_proj.split(".")
    return f"{PREFIX}{module.rsplit('.', 1)[0]}.{proj}.lora_{kind}.weight"


def save_adapter(directory, adapters, model, base=""):
    """adapters {nanosft name: tensor} (full_state_dict's second half) of `model` -> the two files."""
    lora = lora_modules(model)
    m = lora[0][1]
    targets = [p for p in PROJECTIONS if any(p in mod.rows for _, mod in lora)]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": m.rank, "lora_alpha": m.alpha,
              "lora_dropout": m.dropout.p, "target_modules": targets, "base_model_name_or_path": base,
              "inference_mode": True, "init_lora_weights": True, **DEFAULTS}
    os.makedirs(directory, exist_ok=True)
    save_file({peft_key(k): v.contiguous() for k, v in adapters.items()}, os.path.join(directory, WEIGHTS),
              metadata={"format": "pt"})
    write_json(os.path.join(directory, CONFIG), config)


def read_config(path):
    """adapter_config.json -> (targets, rank, alpha, dropout); a ValueError naming the file and what
    it holds that nanosft would not compute the same."""
    cfg = read_json(path)
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: not a LoRA adapter config (peft_type {cfg.get('peft_type') if isinstance(cfg, dict) else cfg!r})")
    for key, default in DEFAULTS.items():
        value = cfg.get(key, default)
        if value != default and (value or default):  # (null, {} and false all mean "not used")
            raise ValueError(f"{path}: {key}={value!r} is not supported (only {default!r})")
    targets = cfg.get("target_modules")
    if isinstance(targets, str) or not targets or any(t not in PROJECTIONS for t in targets):
        raise ValueError(f"{path}: target_modules {targets!r}: nanosft adapts the projections {', '.join(PROJECTIONS)}, "
                         "named in a list")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1 or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"{path}: r must be a whole number of at least 1 and lora_alpha positive, not {rank!r}, {alpha!r}")
    return targets, rank, float(alpha), float(cfg.get("lora_dropout") or 0.0)


def load_adapter(directory, model):
    """Add the adapter saved in `directory` (by nanosft or PEFT) to `model`, unmerged; a ValueError
    naming the file and the tensor when it does not fit the model (another base shape, another rank
    than its config says, a missing or unknown tensor)."""
    config, weights = os.path.join(directory, CONFIG), os.path.join(directory, WEIGHTS)
    for path in (config, weights):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found (an adapter directory holds {CONFIG} and {WEIGHTS})")
    targets, rank, alpha, dropout = read_config(config)
    tensors = {k.replace(".default.", "."): v for k, v in load_file(weights).items()}  # (older PEFT kept the name)
    add_lora(model, targets, rank, alpha, dropout)
    params = dict(model.named_parameters())
    wanted = {peft_key(n): n for n in params if ".lora_" in n}
    missing, unknown = sorted(set(wanted) - set(tensors)), sorted(set(tensors) - set(wanted))
    if missing or unknown:
        raise ValueError(f"{weights}: " + (f"no tensor {missing[0]} (the config's targets need it)" if missing
                                           else f"tensor {unknown[0]} belongs to no adapted projection of this model"))
    for key, name in wanted.items():
        if tensors[key].shape != params[name].shape:
            raise ValueError(f"{weights}: {key} is {tuple(tensors[key].shape)}, this model with r={rank} needs "
                             f"{tuple(params[name].shape)} (an adapter of another base model, or another rank)")
        params[name].data.copy_(tensors[key])
    return model
