"""
What ZeRO saves, measured: the bytes of parameters, fp32 master weights, gradients and optimizer
state a rank really holds, next to the ZeRO paper's estimate of them. train.py calls record_memory
at the second step of every run (the optimizer's state exists from the first) and writes memory.json;
bench/zero_memory.py tabulates it for every stage.

    measure_memory(engine)      every live tensor, found by walking Python's objects, sorted by kind
    estimate_memory(...)        the paper's per-rank bytes for n parameters, a stage and a world size
    activation_bytes(...)       the activations of one training step, per token
    check_fits(...)             train.py's refusal, before training, of a step that cannot fit
"""

import gc
import math
import os

import torch

from nanosft.attention import kept_keys
from nanosft.distributed import base_optimizer, print0
from nanosft.model import FUSED_LOSS_VOCAB
from nanosft.files import write_json


def record_memory(engine, args, n_params, world, run_dir, show=print0, n_trainable=None):
    """Measure what each rank holds after the backward pass of a step, with gradients, weights
    and the optimizer's state all there, and write memory.json: measured bytes per rank next to the ZeRO
    paper's estimate. n_trainable: the weights being trained (LoRA's adapters; default all)."""
    per_rank = [None] * world
    torch.distributed.all_gather_object(per_rank, measure_memory(engine))
    report = {"zero_stage": args.zero_stage, "offload": args.offload, "dtype": args.dtype, "world_size": world,
              "params": n_params, "trained_params": n_params if n_trainable is None else n_trainable, "per_rank": per_rank,
              "estimate_per_rank": estimate_memory(n_params, args.zero_stage, world, args.dtype, muon_weights(engine),
                                                   n_trainable)}
    if torch.distributed.get_rank() == 0:
        write_json(os.path.join(run_dir, "memory.json"), report)
        ms = [sum(dev["model_states"] for dev in r.values()) for r in per_rank]
        show(f"memory: model states {max(ms) / 2**20:.2f} MiB per rank (measured; "
             f"ZeRO estimate {report['estimate_per_rank']['model_states'] / 2**20:.2f} MiB), see memory.json")


MODEL_STATES = ("parameters", "master_weights", "gradients", "optimizer_state")


def _storages(tensors):
    """{storage address: (device type, bytes)} of tensors; views of one storage count once."""
    out = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            try:
                ptr = s.data_ptr()
            except RuntimeError:  # a storage already released (seen with ZeRO-3 and --compile): no memory
                continue
            if s.nbytes():
                out[(t.device.type, ptr)] = (t.device.type, s.nbytes())
    return out


def _tensors_in(obj, names):
    """The tensors held, directly or in lists and dicts, by the attributes `names` of obj."""
    stack = [getattr(obj, name, None) for name in names]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)


# Where DeepSpeed's optimizer wrappers keep the fp32 master weights and the gradients (ZeRO 1/2,
# ZeRO-3, bf16 without ZeRO), outside the torch optimizer's param_groups and .grad.
MASTER_ATTRS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition")
GRAD_ATTRS = ("averaged_gradients", "grads_in_partition", "ipg_buffer", "grad_partitions_flat_buffer",
              "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition", "fp32_groups_gradients_flat")


def measure_memory(engine):
    """Bytes of the tensors alive on this rank, by kind and device. Every live tensor is found by
    walking Python's objects (views counted once, by storage) and sorted into: optimizer state
    (Adam's moments), master weights (the optimizer's own fp32 copy, where it keeps one),
    parameters (the module's weights or, under ZeRO-3, its shard), gradients (.grad and ZeRO's
    gradient buffers) and other (the batch, rotary tables, communication buffers). Call it while gradients exist (before the
    optimizer step) to see the peak."""
    base = base_optimizer(engine)
    state = _storages(t for s in base.state.values() for t in s.values())
    module_params = list(engine.module.parameters())
    params = _storages([getattr(p, "ds_tensor", p) for p in module_params])
    masters = [p for g in base.param_groups for p in g["params"]] + list(_tensors_in(engine.optimizer, MASTER_ATTRS))
    master = _storages(masters)
    grads = _storages([p.grad for p in module_params + masters] + list(_tensors_in(engine.optimizer, GRAD_ATTRS)))
    # type(), not isinstance: no properties run. Tensor subclasses are skipped altogether: the ones
    # found here are torch.compile's fake tensors (--compile), which hold no memory and whose data
    # pointer must not be read; nanosft and DeepSpeed keep their data in plain tensors and Parameters
    alive = _storages(o for o in gc.get_objects() if type(o) in (torch.Tensor, torch.nn.Parameter))
    kinds = {"optimizer_state": state, "parameters": params, "master_weights": master, "gradients": grads}
    seen = set()
    report = {}
    for kind, found in kinds.items():
        for key, (dev, n) in found.items():
            if key not in seen:
                seen.add(key)
                report.setdefault(dev, {}).setdefault(kind, 0)
                report[dev][kind] += n
    for key, (dev, n) in alive.items():
        if key not in seen:
            report.setdefault(dev, {}).setdefault("other", 0)
            report[dev]["other"] += n
    for dev in report:
        for k in MODEL_STATES + ("other",):
            report[dev].setdefault(k, 0)
        report[dev]["model_states"] = sum(report[dev][k] for k in MODEL_STATES)
    if "cuda" in report:  # what the caching allocator says, activations and NCCL buffers included
        report["cuda"]["allocator_peak"] = torch.cuda.max_memory_allocated()
        report["cuda"]["allocator_reserved"] = torch.cuda.memory_reserved()
    return report


def muon_weights(engine):
    """How many weights DeepSpeed's Muon updates (it tags them use_muon); 0 under AdamW."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters() if getattr(p, "use_muon", False))


def estimate_memory(n_params, stage, world, dtype, n_muon=0, n_trainable=None):
    """The ZeRO paper's per-rank bytes of model states for n_params weights and Adam: per weight,
    2 or 4 bytes of parameter and of gradient, 4 of fp32 master copy (mixed precision only) and 8
    of Adam moments (4 for the n_muon weights Muon updates: one momentum); stage 1 divides the
    master copy and the optimizer state by the world size, stage 2 the gradients too, stage 3 the
    parameters too. n_trainable (LoRA: the adapters): the weights that have gradients, master
    copies and optimizer state (default: all)."""
    half = dtype in ("bf16", "fp16")
    trained = n_params if n_trainable is None else n_trainable
    per_weight = {"parameters": 2 if half else 4, "gradients": 2 if half else 4, "master_weights": 4 if half else 0}
    split_from = {"parameters": 3, "gradients": 2, "master_weights": 1, "optimizer_state": 1}
    total = {k: (n_params if k == "parameters" else trained) * b for k, b in per_weight.items()}
    total["optimizer_state"] = 8 * (trained - n_muon) + 4 * n_muon
    est = {k: b / (world if stage >= split_from[k] else 1) for k, b in total.items()}
    est["model_states"] = sum(est.values())
    return est


def activation_bytes(cfg, T, dtype, impl="sdpa", checkpointing=False):
    """Bytes per token of one training step's activations, estimated from the model's shapes. Per
    layer, the tensors its backward pass needs: the block's input and norm outputs, q/k/v before and
    after RoPE, the attention output, SwiGLU's gate/up and their product (4C + 4Cq + 3Ckv + 4F
    values), and the attention mask's rows (BlockwiseMask keeps those of the blocks that reach at
    most 2 x BLOCK keys back; the manual path keeps its softmax weights instead, in fp32, one per
    head). Then the logits in fp32, unless the loss is fused (model.FUSED_LOSS_VOCAB). With
    --gradient-checkpointing each block keeps only its input, and the backward pass recomputes one
    block at a time. The factor 1.5 covers the backward pass's own temporaries: against the peak
    resident memory of real steps the estimate comes out 0.9-2x (tests/test_memory.py)."""
    act = 2 if dtype in ("bf16", "fp16") else 4
    C, F = cfg.dim, cfg.ffn_hidden
    Cq, Ckv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    keys = kept_keys(T)  # mask columns kept per query
    # per key and layer: the manual path's fp32 softmax weights, one per head; else the mask's value in
    # the activations' dtype, one per head for ALiBi's penalties in bf16/fp16 (attend_sdpa converts
    # the shared fp32 mask in every layer)
    per_key = cfg.n_head * 4 if impl == "manual" else act * (cfg.n_head if cfg.pos_emb == "alibi" and act < 4 else 1)
    layer = (4 * C + 4 * Cq + 3 * Ckv + 4 * F) * act + keys * per_key
    logits = 0 if cfg.vocab_size >= FUSED_LOSS_VOCAB else 3 * cfg.vocab_size * 4
    kept = cfg.n_layer * C * act + 2 * layer if checkpointing else cfg.n_layer * layer
    return 1.5 * (kept + logits)


def check_fits(cfg, n_params, batch, grad_accum, T, dtype, stage, world, checkpointing, free, offload="none",
               n_trainable=None, rows_per_item=1, logits=False):
    """Before training: does a rank's estimated need (model states as the ZeRO paper counts them
    for Adam, plus a micro-batch's activations) fit in free = (bytes, what they are), from
    least_free? Measured peaks are 0.5-1.1x the estimate, so a run whose estimate is over twice what
    is free raises ValueError, saying what would fit; one merely over it gets a note back (else
    None). offload: what leaves that memory (a GPU's; on a CPU nothing leaves): "optimizer"
    (master weights and optimizer state) or "all" (the weights too). n_trainable: LoRA's adapters.
    rows_per_item: rows one --batch-size item takes (2 for a preference pair); logits: the full
    logits are kept even for a large vocabulary (DPO's reply log-probabilities)."""
    def need(items, tokens):
        per_token = activation_bytes(cfg, tokens, dtype, cfg.attn_impl, checkpointing)
        if logits and cfg.vocab_size >= FUSED_LOSS_VOCAB:
            per_token += 1.5 * 3 * cfg.vocab_size * 4  # fp32 logits, log-softmax, gradient
        return states + items * rows_per_item * tokens * per_token
    parts = estimate_memory(n_params, stage, world, dtype, n_trainable=n_trainable)
    away = {"none": (), "optimizer": ("master_weights", "optimizer_state"),
            "all": ("master_weights", "optimizer_state", "parameters")}[offload]
    states = parts["model_states"] - sum(parts[k] for k in away)
    total = need(batch, T)
    if free is None or total <= free[0]:
        return None
    available, what = free
    rows = next((r for r in range(batch - 1, 0, -1) if need(r, T) <= available), 0)
    tokens = next((t for t in (2 ** i for i in range(int(math.log2(T)), 5, -1)) if need(1, t) <= available), 0)
    per_step = batch * grad_accum  # items (rows, or pairs) per optimizer step: kept by the suggestion
    if rows:
        fits = f"--batch-size {rows} --grad-accum {math.ceil(per_step / rows)}"
    elif tokens:
        fits = f"--batch-size 1 --grad-accum {per_step} --max-seq-len {tokens}"
    else:
        fits = "a smaller model, or ZeRO stage 3 over more ranks"
    gib = 2 ** 30
    why = (f"{batch * rows_per_item} rows x {T:,} tokens a micro-batch need about {total / gib:.1f} GiB (estimated), "
           f"more than {what} ({available / gib:.1f} GiB): try {fits}"
           + ("" if checkpointing else ", or --gradient-checkpointing"))
    if total / 2 > available:
        raise ValueError(why)
    return "note: this run may not fit in memory: " + why


def least_free(free):
    """The least of every rank's free memory (machine.free_memory's (bytes, what)), so that the
    ranks refuse a run together or not at all."""
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, free)
    known = [f for f in every if f is not None]
    return min(known) if known else None
