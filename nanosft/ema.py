"""
An exponential moving average of the policy's weights (DeepSpeed-Chat's --enable_ema), for the RL
stages: after every optimizer step

    ema = beta * ema + (1 - beta) * w        over the trained parameters (the adapters under LoRA)

RL updates are noisy (each follows one rollout's sampled replies); the average of the last
~1/(1 - beta) steps' weights is often a steadier model than the last step's. train.py keeps it with
`--ema BETA`, writes it into every checkpoint (a resumed run continues the same average) and saves
it at the end as a model of its own, RUN/ema/, evaluated beside the last weights.

The average is of the fp32 master weights, gathered from the ZeRO shards by every rank (a
collective); rank 0 alone keeps it.
"""

import deepspeed
import torch

from nanosft.distributed import is_rank0
from nanosft.safetensors import load_file, save_file


def master_weights(engine):
    """-> [(name, fp32 tensor on CPU)] of the trained parameters, on rank 0 ([] elsewhere; every
    rank must call this under ZeRO)."""
    out = []
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            full = deepspeed.utils.safe_get_full_fp32_param(p)
            full = p.detach() if full is None else full
            if is_rank0():
                out.append((name, full.float().cpu().clone()))
    return out


class EMA:
    def __init__(self, engine, beta):
        self.beta = beta
        self.shadow = dict(master_weights(engine))  # {name: fp32} (rank 0; {} elsewhere)

    @torch.no_grad()
    def update(self, engine):
        for name, w in master_weights(engine):
            self.shadow[name].mul_(self.beta).add_(w, alpha=1 - self.beta)

    def save(self, path):
        if self.shadow:
            save_file(self.shadow, path)

    def load(self, path):
        if is_rank0():
            loaded = load_file(path)
            if loaded.keys() != self.shadow.keys():
                raise ValueError(f"{path}: the average holds other parameters than this run trains")
            self.shadow = loaded
