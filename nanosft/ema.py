"""
An exponential moving average of the policy's weights (DeepSpeed-Chat's --enable_ema), for the RL
stages: after every training step (a rollout and its --ppo-epochs updates)

    ema = beta * ema + (1 - beta) * w        over the trained parameters (the adapters under LoRA)

RL updates are noisy (each follows one rollout's sampled replies); the average of the last
~1/(1 - beta) training steps' weights is often a steadier model than the last step's. train.py
keeps it with `--ema BETA`, writes it into every checkpoint (a resumed run continues the same
average) and saves it at the end as a model of its own, RUN/ema/, evaluated beside the last weights.

The average is of the fp32 master weights (distributed.fp32_weights: the optimizer's copy under
bf16/fp16, gathered from the ZeRO shards by every rank); rank 0 alone keeps it.
"""

import os

import torch

from nanosft.distributed import fp32_weights, is_rank0
from nanosft.safetensors import load_file, save_file


class EMA:
    def __init__(self, engine, beta):
        self.beta = beta
        self.shadow = dict(fp32_weights(engine, trained_only=True))  # {name: fp32} (rank 0; {} elsewhere)

    @torch.no_grad()
    def update(self, engine):
        for name, w in fp32_weights(engine, trained_only=True):
            self.shadow[name].mul_(self.beta).add_(w, alpha=1 - self.beta)

    def save(self, path):  # (into a checkpoint's directory, made here before DeepSpeed writes its part)
        if self.shadow:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_file(self.shadow, path)

    def load(self, path):
        if is_rank0():
            loaded = load_file(path)
            if loaded.keys() != self.shadow.keys():
                raise ValueError(f"{path}: the average holds other parameters than this run trains")
            self.shadow = loaded
