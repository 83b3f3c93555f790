"""
A run directory on disk, and how to load one back for chat and evaluation.

    runs/<name>/
      model.pt          the weights: a plain tensor state dict (loaded with weights_only=True,
                        so opening a checkpoint can never run code)
      config.json       ModelConfig fields
      tokenizer.model   SentencePiece format, see tokenizer.py
      ds_config.json    the DeepSpeed config the run actually used
      train_log.csv     one row per optimizer step
      metrics.json      validation loss/perplexity, held-out exact match, speed
    runs/latest -> <name>   the newest run

train.py writes it, chat.py and evaluate.py read it.
"""

import json
import os

import torch

from nanosft.model import ModelConfig, Transformer
from nanosft.tokenizer import Tokenizer


def save_model(run_dir, state_dict, cfg: ModelConfig):
    os.makedirs(run_dir, exist_ok=True)
    # tied weights appear under two names; torch.save writes their shared storage once
    state = {k: v.detach().cpu() for k, v in state_dict.items()}
    tmp = os.path.join(run_dir, "model.pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(run_dir, "model.pt"))  # never a half-written model.pt
    write_json(os.path.join(run_dir, "config.json"), cfg.to_dict())


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def point_latest(run_dir):
    """Make runs/latest (next to run_dir) point at run_dir."""
    parent, name = os.path.split(os.path.abspath(run_dir))
    link = os.path.join(parent, "latest")
    tmp = link + ".tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(name, tmp)
    os.replace(tmp, link)


def load_run(run_dir, device="cpu"):
    """-> (model in eval mode, tokenizer). FileNotFoundError names what is missing."""
    for f in ("model.pt", "config.json", "tokenizer.model"):
        if not os.path.exists(os.path.join(run_dir, f)):
            raise FileNotFoundError(f"{os.path.join(run_dir, f)} not found")
    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
        cfg = ModelConfig(**json.load(f))
    model = Transformer(cfg)
    state = torch.load(os.path.join(run_dir, "model.pt"), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    tok = Tokenizer.load(os.path.join(run_dir, "tokenizer.model"))
    return model.to(device).eval(), tok
