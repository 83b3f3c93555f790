"""
LoRA (Hu et al., 2021): fine-tune a model by training a small low-rank update beside each chosen
weight matrix, the matrix itself frozen.

    y = x W^T + b  +  (alpha / r) * dropout(x) A^T B^T          W (out, in), A (r, in), B (out, r)

A starts random (Kaiming-uniform, as PEFT initialises it) and B at zero, so the update is exactly
zero at step 0: training starts from the model as it is. Only A and B get gradients and optimizer
state, r * (in + out) numbers per matrix instead of in * out (2% of a 512-wide layer at rank 8),
which is what lets a 7B model fine-tune on one GPU. alpha / r scales the update so that changing r
does not change how far a learning rate moves the model.

Targets are named as Llama's projections (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
down_proj), as a PEFT user names them. nanosft stacks q/k/v and gate/up into one matrix each
(model.py): an adapter on "q_proj" is its own A and B on the q rows of qkv_proj, exactly the
adapter PEFT would put on a separate q_proj, so adapters move between the two unchanged
(adapter.py writes and reads PEFT's files).

    add_lora(model, ["q_proj", "v_proj"], rank=8, alpha=16)   freeze the model, add the adapters
    merge_lora(model)                                           W += (alpha / r) B A; adapters gone
"""

import math

import torch
import torch.nn as nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUPS = {"all": PROJECTIONS, "qkv": ("q_proj", "k_proj", "v_proj"), "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
          "mlp": ("gate_proj", "up_proj", "down_proj"), "gate_up": ("gate_proj", "up_proj")}


def projection_rows(cfg):
    """Llama projection -> (nanosft module within a block, its rows (start, stop) in that matrix)."""
    q, kv, ffn = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.ffn_hidden
    return {"q_proj": ("self_attn.qkv_proj", (0, q)), "k_proj": ("self_attn.qkv_proj", (q, q + kv)),
            "v_proj": ("self_attn.qkv_proj", (q + kv, q + 2 * kv)), "o_proj": ("self_attn.o_proj", (0, cfg.dim)),
            "gate_proj": ("mlp.gate_up_proj", (0, ffn)), "up_proj": ("mlp.gate_up_proj", (ffn, 2 * ffn)),
            "down_proj": ("mlp.down_proj", (0, cfg.dim))}


def expand_targets(names):
    """["qkv", "o_proj"] -> ("q_proj", "k_proj", "v_proj", "o_proj"): group names expanded, in
    PROJECTIONS order; a name that is neither a projection nor a group is a ValueError."""
    out = set()
    for name in names:
        if name not in PROJECTIONS and name not in GROUPS:
            raise ValueError(f"LoRA target {name!r} matches no projection (one of {', '.join(PROJECTIONS)}, "
                             f"or a group: {', '.join(GROUPS)})")
        out |= set(GROUPS.get(name, (name,)))
    return tuple(p for p in PROJECTIONS if p in out)


class LoRALinear(nn.Linear):
    """A frozen nn.Linear (the same weight and bias, under the same names) plus one adapter per
    block of rows in `parts` {projection name: (start, stop)}."""

    def __init__(self, base: nn.Linear, parts, rank, alpha, dropout=0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rows = dict(parts)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        p = base.weight
        self.lora_A = nn.ParameterDict({n: nn.Parameter(p.new_empty(rank, self.in_features)) for n in self.rows})
        self.lora_B = nn.ParameterDict({n: nn.Parameter(p.new_zeros(stop - start, rank))
                                        for n, (start, stop) in self.rows.items()})
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's own init, as PEFT does
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):  # (B, T, in) -> (B, T, out)
        y = super().forward(x)
        # all the adapters at once: their A's stacked, their B's side by side, each in its own rows
        # (zeros elsewhere); two thin matmuls, whatever the number of adapters on this matrix
        A = torch.cat([self.lora_A[name] for name in self.rows])  # (n r, in)
        h = self.dropout(x) if self.dropout.p else x
        return y + (h @ A.t()) @ (self.stacked_B().t() * self.scale)  # (B, T, n r) -> (B, T, out)

    def stacked_B(self):
        """(out, n r): adapter j's B in its rows and in columns j r .. (j + 1) r."""
        r = self.rank
        if len(self.rows) == 1 and next(iter(self.rows.values())) == (0, self.out_features):
            return self.lora_B[next(iter(self.rows))]
        B = self.weight.new_zeros(self.out_features, r * len(self.rows))
        for j, (name, (start, stop)) in enumerate(self.rows.items()):
            B[start:stop, j * r:(j + 1) * r] = self.lora_B[name]
        return B

    @torch.no_grad()
    def fold(self, weight, A, B):
        """weight + (alpha / r) B A in each adapter's rows (A, B: {projection: tensor}): the plain
        matrix that computes what this layer does, from its own tensors or from a state dict's."""
        w = weight.detach().clone()
        for name, (start, stop) in self.rows.items():
            w[start:stop] += (self.scale * (B[name].float() @ A[name].float())).to(w.dtype)
        return w


def add_lora(model, targets, rank, alpha, dropout=0.0):
    """Freeze every parameter of `model`, then put adapters of `rank` on the `targets` projections
    (names or groups, see expand_targets) of every block. -> the projections adapted."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, not {rank}")
    projections = expand_targets(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    rows = projection_rows(model.cfg)
    for block in model.layers:
        by_module = {}
        for proj in projections:
            module, span = rows[proj]
            by_module.setdefault(module, {})[proj] = span
        for path, parts in by_module.items():
            owner_path, attr = path.split(".")
            owner = getattr(block, owner_path)
            setattr(owner, attr, LoRALinear(getattr(owner, attr), parts, rank, alpha, dropout))
    return projections


def lora_modules(model):
    """(name, LoRALinear) of every adapted projection."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its matrix and put the plain nn.Linear back: the model computes the
    same without the adapters' extra matmuls (a run directory saves the same fold, split_merged)."""
    for name, m in lora_modules(model):
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device,
                          dtype=m.weight.dtype)
        plain.weight.copy_(m.fold(m.weight, m.lora_A, m.lora_B))
        if m.bias is not None:
            plain.bias.copy_(m.bias)
        setattr(owner, name.rsplit(".", 1)[1], plain)
    return model


def split_merged(state, model):
    """A state dict of `model` holding adapters ("...qkv_proj.lora_A.q_proj", as named_parameters
    names them) -> (the merged model's plain state dict, the adapters alone): what a run saves.
    ({}: a model without adapters, whose state comes back as it is.)"""
    merged = {k: v for k, v in state.items() if ".lora_" not in k}
    adapters = {k: v for k, v in state.items() if ".lora_" in k}
    for name, m in lora_modules(model):
        A, B = ({p: adapters[f"{name}.lora_{kind}.{p}"] for p in m.rows} for kind in "AB")
        merged[f"{name}.weight"] = m.fold(merged[f"{name}.weight"], A, B)
    return merged, adapters
