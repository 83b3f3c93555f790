"""
Running under DeepSpeed: the plumbing train.py needs, so that train.py itself can tell the story.

    setup_distributed()         one code path for `python train.py` (a world of one) and the launcher
    deepspeed_config(...)       the JSON DeepSpeed reads: configs/ds_config.json (or --ds-config) + flags
    make_optimizer(...)         AdamW; DeepSpeed's CPU Adam when ZeRO-Offload moves the optimizer to CPU
    with_muon(cfg, ...)         or Muon: DeepSpeed builds it from the config
    lr_schedule(...)            linear warm-up, then cosine decay to 10%
    full_state_dict(engine)     the fp32 weights (LoRA merged, and apart), gathered from the ZeRO shards
    save_checkpoint / load_checkpoint   everything needed to resume, with a `latest` that is never
                                half-written; rng_state / set_rng_state for what they carry
    print0(...)                 every message of a run: printed on rank 0 only

ZeRO in one paragraph (Rajbhandari et al., 2020): plain data parallelism keeps a full copy of the
weights, the gradients and the optimizer state (Adam: two more tensors per weight) on every rank.
Stage 1 splits the optimizer state across the ranks, stage 2 the gradients as well, stage 3 the
weights too (they are gathered layer by layer just before use). Offload keeps the optimizer state
(and with stage 3 the weights) in CPU memory. The maths does not change: tests/test_zero.py checks
that every stage trains exactly like one rank without ZeRO; memory.py measures what each stage saves.
"""

import copy
import importlib
import math
import os
import random
import shutil
import socket
import sys

import deepspeed
import numpy as np
import torch

from nanosft.files import atomic_write
from nanosft.lora import split_merged

# DeepSpeed compiles the ops it needs on a CPU (CPU Adam for --offload) on first use into
# TORCH_EXTENSIONS_DIR, by default one folder for every Python environment of the user: two
# checkouts would rebuild them in turn, minutes each time. In a virtual environment they go inside
# it instead, unless the variable is set.
if sys.prefix != sys.base_prefix:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


# -----------------------------------------------------------------------------
# process group

def setup_distributed():
    """-> (device, rank, world). Under the deepspeed launcher RANK etc. are set; without it,
    describe a world of one so that deepspeed does not go looking for MPI."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not torch.distributed.is_initialized():
        if device.type == "cpu":
            # DeepSpeed's CPU backend compiles a shared-memory all-reduce on first use (~30-50 s on 2
            # cores) that only its inference all-reduce calls: training's collectives go through
            # torch.distributed (gloo) either way
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    return device, torch.distributed.get_rank(), torch.distributed.get_world_size()


def is_rank0():
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def print0(*a, **k):
    """Print on rank 0 only; every message of a run goes through here."""
    if is_rank0():
        print(*a, **k, flush=True)


def all_sum(values, device):
    """Sum a list of Python numbers over all ranks, element by element (float64, so token counts
    stay exact)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


# -----------------------------------------------------------------------------
# the DeepSpeed config

def deepspeed_config(base, *, world, micro_batch, grad_accum, zero_stage, offload, dtype, grad_clip, pin_memory,
                     log_dir=None, tensorboard=False):
    """base (a DeepSpeed JSON as a dict) with the run's settings written over it. With log_dir,
    DeepSpeed's monitor writes CSVs to log_dir/monitor (and TensorBoard logs to log_dir/tensorboard);
    any other monitor the file enables (wandb, comet) stays on."""
    for key in ("optimizer", "scheduler"):
        if key in base:
            raise ValueError(f'the DeepSpeed config has an "{key}" section; train.py builds the optimizer '
                             "and the schedule from --optimizer, --lr, --muon-lr, --weight-decay and --warmup-steps "
                             "(a run's saved ds_config.json has the section it was given), remove it")
    cfg = copy.deepcopy(base)
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = grad_accum
    cfg["train_batch_size"] = micro_batch * grad_accum * world
    cfg["gradient_clipping"] = grad_clip
    zero = cfg.setdefault("zero_optimization", {})
    zero["stage"] = zero_stage
    if offload != config_settings(base)["offload"]:  # the flag changed it (else keep the file's, NVMe and all)
        zero.pop("offload_optimizer", None)
        zero.pop("offload_param", None)
        if offload in ("optimizer", "all"):
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
        if offload == "all":
            zero["offload_param"] = {"device": "cpu", "pin_memory": pin_memory}
    cfg.setdefault("bf16", {})["enabled"] = dtype == "bf16"
    cfg.setdefault("fp16", {})["enabled"] = dtype == "fp16"
    if log_dir:
        cfg["csv_monitor"] = {"enabled": True, "output_path": log_dir, "job_name": "monitor"}  # = monitor.MONITOR_DIR
        if tensorboard:
            cfg["tensorboard"] = {"enabled": True, "output_path": log_dir, "job_name": "tensorboard"}
    return cfg


def inference_config(train_cfg):
    """The DeepSpeed config of a frozen model that runs beside a trained one (DPO's --reference
    live): the same dtype and micro-batch, no optimizer; its weights sharded (ZeRO-3, gathered a
    layer at a time for each forward) when the trained model's are, else whole on every rank, as
    DeepSpeed-Chat runs its reference model."""
    zero = train_cfg.get("zero_optimization", {})
    sharded = zero.get("stage") == 3
    cfg = {k: train_cfg[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")}
    cfg["zero_optimization"] = {"stage": 3 if sharded else 0,
                                **({"offload_param": zero["offload_param"]} if sharded and "offload_param" in zero else {})}
    for dtype in ("bf16", "fp16"):
        cfg[dtype] = {"enabled": train_cfg.get(dtype, {}).get("enabled", False)}
    return cfg


def config_settings(base):
    """The settings a DeepSpeed config already makes, in flag terms (None: it says nothing); flags
    given on the command line win over these, and these over the built-in defaults. A config
    that lists both a bf16 and an fp16 section, neither enabled, asks for fp32."""
    zero = base.get("zero_optimization", {})
    offloaded = lambda key: zero.get(key, {}).get("device", "none") != "none"  # noqa: E731
    offload = "all" if offloaded("offload_param") else "optimizer" if offloaded("offload_optimizer") else None
    bf16, fp16 = base.get("bf16", {}).get("enabled"), base.get("fp16", {}).get("enabled")
    dtype = "bf16" if bf16 else "fp16" if fp16 else "fp32" if "bf16" in base and "fp16" in base else None
    return {"batch_size": base.get("train_micro_batch_size_per_gpu"), "grad_accum": base.get("gradient_accumulation_steps"),
            "zero_stage": zero.get("stage"), "offload": offload, "dtype": dtype, "grad_clip": base.get("gradient_clipping")}


def param_groups(model, weight_decay, lora_lr=None):
    """The trainable parameters (with LoRA, the adapters alone: frozen ones get no gradient and no
    optimizer state), weight decay on matrices only (norms, 1-d tensors, keep their scale), and the
    adapters at lora_lr when given."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.dim() >= 2 and ".lora_" not in n]
    adapters = [p for n, p in trainable if ".lora_" in n]
    no_decay = [p for n, p in trainable if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if adapters:
        groups.append({"params": adapters, "weight_decay": weight_decay, **({"lr": lora_lr} if lora_lr else {})})
    return [g for g in groups if g["params"]]


def make_optimizer(model, lr, weight_decay, offload, lora_lr=None):
    """AdamW with no weight decay on norms. With ZeRO-Offload the optimizer steps on the CPU, where
    DeepSpeed's vectorized CPU Adam (compiled on first use) is much faster than torch's; it computes
    the same AdamW update."""
    groups = param_groups(model, weight_decay, lora_lr)
    if offload != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, lr=lr, betas=(0.9, 0.95), adamw_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def with_muon(cfg, lr, muon_lr):
    """cfg with DeepSpeed's Muon as its optimizer (Jordan et al., 2024): each weight matrix of the
    blocks moves along its momentum orthogonalized by a Newton-Schulz iteration, so that every
    direction of the update has the same size and directions that few examples push along (an
    induction head's, early on) learn as fast as common ones; at muon_lr. The embeddings, the head
    and the norms keep AdamW at lr. DeepSpeed tells the two apart by name ("embed", "lm_head") and
    shape (a fused matrix such as qkv_proj is one matrix to it), and runs the iteration on whole
    matrices under every ZeRO stage; stage 3 then reduces gradients whole, not scattered. Its
    default "gram" iteration runs in fp16 where the device has fast fp16, else in fp32."""
    cfg = copy.deepcopy(cfg)
    # torch_adam: the other half is torch's AdamW, as with --optimizer adamw, rather than DeepSpeed's
    # FusedAdam, which is compiled on first use (and a build cut short leaves a lock that stalls the
    # next run)
    cfg["optimizer"] = {"type": "Muon", "params": {"muon_lr": muon_lr, "adam_lr": lr, "momentum": 0.95,
                                                   "betas": [0.9, 0.95], "eps": 1e-8, "torch_adam": True}}
    if cfg["zero_optimization"]["stage"] == 3:
        cfg["zero_optimization"]["reduce_scatter"] = False  # DeepSpeed refuses Muon with it
    return cfg


def lr_schedule(optimizer, warmup, total):
    """Linear warm-up over `warmup` steps, then cosine decay to 10% of the peak at step `total`."""
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def lr_factor(engine):
    """Where the schedule stands: the current multiple of the peak rates, the same for every group."""
    schedule = engine.lr_scheduler
    return schedule.get_last_lr()[0] / schedule.base_lrs[0]


def base_optimizer(engine):
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO, bf16)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def current_loss_scale(engine):
    """fp16's current dynamic loss scale, None without fp16. (engine.loss_scale() is the configured
    one: 0 for dynamic.)"""
    return float(engine.optimizer.loss_scale) if engine.fp16_enabled() else None  # every DeepSpeed fp16 wrapper has it


# -----------------------------------------------------------------------------
# weights and checkpoints

def fp32_weights(engine, trained_only=False):
    """-> [(name, fp32 tensor on CPU)] of the module's parameters (the trained ones only, if asked)
    on rank 0, [] elsewhere. With mixed precision the module holds 16-bit copies; the fp32 master
    weights live in the (possibly sharded) optimizer and are what this returns. Every rank must call
    this: gathering ZeRO shards is collective."""
    opt = engine.optimizer
    # bf16/fp16 without ZeRO: the wrapper keeps one fp32 copy per parameter, group by group
    unsharded = {id(p): q for low, high in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", []))
                 for p, q in zip(low, high)}
    out = []
    for name, p in engine.module.named_parameters():
        if trained_only and not p.requires_grad:
            continue
        full = unsharded.get(id(p))
        if full is None and p.requires_grad:  # ZeRO (any stage, gathered) or bf16 with its own optimizer
            full = deepspeed.utils.safe_get_full_fp32_param(p)
        if full is None and hasattr(p, "ds_id"):  # frozen (LoRA's base) under ZeRO-3: no master copy, gather it
            with deepspeed.zero.GatheredParameters([p]):
                full = p.detach().clone()
        if is_rank0():  # the other ranks took part in the gather; they need not keep a copy
            out.append((name, (p.detach() if full is None else full).float().cpu().clone()))
    return out


def full_state_dict(engine, weights=None, replace=None):
    """-> ({name: fp32 tensor on CPU} of the whole model, the LoRA adapters alone) on rank 0 ({}, {}
    elsewhere; the adapters {} without LoRA): fp32_weights, with the adapters folded into their
    matrices: the state is the merged model's. Every rank must call this, unless `weights` holds
    fp32_weights' answer already (then nothing is gathered again). replace: {name: tensor} to take
    instead of the trained weights (rank 0's; --ema's average)."""
    state = dict(fp32_weights(engine) if weights is None else weights)
    state.update(replace or {})
    # tied: named_parameters lists the shared matrix once (a reward model, "model.*" and "score.weight", has no head)
    if "embed_tokens.weight" in state and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return split_merged(state, engine.module) if state else ({}, {})


def checkpoint_tag(step):
    """The directory, under a run's checkpoints/, of the checkpoint of this step."""
    return f"step{step:08d}"


def save_checkpoint(engine, ckpt_dir, step, client_state, keep=2):
    """A DeepSpeed checkpoint (module, optimizer with its ZeRO shards, LR schedule, loss scaler,
    client_state) in ckpt_dir/step00000123/. `latest` names it only once every rank has written
    its part, and is replaced atomically: a run killed at any moment leaves a `latest` that names
    a complete checkpoint. The `keep` most recent checkpoints are kept."""
    tag = checkpoint_tag(step)
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    torch.distributed.barrier()
    if is_rank0():
        with atomic_write(os.path.join(ckpt_dir, "latest")) as f:
            f.write(tag)
        # older ones beyond `keep`, and any later ones: left by a run that was killed and resumed
        # from before them, they belong to a past that did not happen
        tags = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step") and d != tag)
        older = [d for d in tags if d < tag]
        for d in older[:max(len(older) - keep + 1, 0)] + [d for d in tags if d > tag]:
            shutil.rmtree(os.path.join(ckpt_dir, d), ignore_errors=True)
    torch.distributed.barrier()


def rng_state():
    """Every random number generator a run touches. (Training draws none today: data order is
    seeded per epoch and there is no dropout. Saved so that a change that adds some resumes right.)"""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    # The current GPU's generator only, not every visible GPU's: a resume may see fewer GPUs. (DeepSpeed
    # keeps one rank's client state, so every rank resumes with that rank's CUDA state.)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and torch.is_tensor(state["cuda"]):  # (not older lists)
        torch.cuda.set_rng_state(state["cuda"])


def load_checkpoint(engine, ckpt_dir, tag=None):
    """Restore the checkpoint `latest` names (or `tag`'s); returns its client_state."""
    latest = os.path.join(ckpt_dir, "latest")
    if tag is None and not os.path.exists(latest):
        raise FileNotFoundError(f"{latest} not found: nothing to resume (checkpoints are written every --save-every steps)")
    if tag is None:
        with open(latest, encoding="utf-8") as f:
            tag = f.read().strip()
    path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag)
    if path is None:
        raise ValueError(f"{os.path.join(ckpt_dir, tag)}: DeepSpeed could not load this checkpoint")
    return client_state
