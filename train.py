"""
Supervised fine-tuning, through DeepSpeed. One process on a laptop CPU by default:

    python train.py                                   # the default run on data/train.jsonl
    deepspeed --num_gpus 2 train.py --zero-stage 2    # the same script on 2 GPUs (or 2 CPU ranks)

The story: read and validate the chat data -> train (or load) the tokenizer -> render and pack the
conversations -> build the model -> deepspeed.initialize (ZeRO, bf16/fp16, gradient clipping from
configs/ds_config.json plus the flags below) -> train with the masked SFT loss -> evaluate
(validation loss, held-out exact match) -> save the run directory (see nanosft/checkpoint.py).
"""

import argparse
import csv
import json
import math
import os
import random
import socket
import time

import deepspeed
import numpy as np
import torch

from nanosft.checkpoint import load_model, point_latest, save_model, write_json
from nanosft.data import epoch_rows, load_jsonl, pack, padding_fraction, shard, to_batch, tokenize
from nanosft.evaluate import check_eval_record, exact_match, format_scores, loss_and_ppl, validation_loss
from nanosft.loss import masked_nll
from nanosft.model import ModelConfig, Transformer
from nanosft.template import ChatTemplate
from nanosft.tokenizer import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="supervised fine-tuning of a chat model with DeepSpeed")
    # data
    p.add_argument("--data", default=os.path.join(HERE, "data/train.jsonl"), help="training chat JSONL")
    p.add_argument("--val-data", default=os.path.join(HERE, "data/val.jsonl"), help="validation chat JSONL ('' to skip)")
    p.add_argument("--eval-data", default=os.path.join(HERE, "data/eval.jsonl"),
                   help="held-out prompts with answers for exact match ('' to skip)")
    p.add_argument("--max-seq-len", type=int, default=256, help="tokens per packed row (the context length)")
    p.add_argument("--init-from", default="", help="start from this run or Hugging Face Llama-family directory "
                   "(its model shape and tokenizer replace the model and tokenizer flags)")
    p.add_argument("--tokenizer", default="", help="a .model file to use instead of training one")
    p.add_argument("--vocab-size", type=int, default=1024, help="vocabulary of the tokenizer trained on --data")
    p.add_argument("--tokenizer-trainer", default="nanosft", choices=["nanosft", "spm"],
                   help="train the tokenizer by hand (readable) or with the sentencepiece library (large corpora)")
    # model
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-kv-head", type=int, default=2, help="key/value heads (grouped-query attention)")
    p.add_argument("--attn-impl", default="sdpa", choices=["sdpa", "manual"])
    # optimization
    p.add_argument("--batch-size", type=int, default=16, help="packed rows per micro-batch per rank")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (0: use --epochs)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data when --steps is 0")
    # deepspeed
    p.add_argument("--ds-config", default=os.path.join(HERE, "configs/ds_config.json"))
    p.add_argument("--zero-stage", type=int, default=None, choices=[0, 1, 2, 3], help="override the config's stage")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on CPU and on GPUs that support it, else fp16")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    # run
    p.add_argument("--out", default="", help="run directory (default runs/<timestamp>)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--log-every", type=int, default=25)
    args = p.parse_args(argv)
    if args.dim % args.n_head or (args.dim // args.n_head) % 2:
        p.error(f"--dim {args.dim} must split into --n-head {args.n_head} heads of an even size (RoPE rotates pairs)")
    if args.n_head % args.n_kv_head:
        p.error(f"--n-head {args.n_head} must be a multiple of --n-kv-head {args.n_kv_head}")
    if min(args.batch_size, args.grad_accum, args.max_seq_len, args.n_layer) < 1 or args.steps < 0:
        p.error("--batch-size, --grad-accum, --max-seq-len and --n-layer must be at least 1, --steps not negative")
    return args


# -----------------------------------------------------------------------------
# distributed set-up: the same code for `python train.py` and the deepspeed launcher

def setup_distributed():
    # Without a launcher, describe a world of one so deepspeed does not go looking for MPI.
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
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    return device, torch.distributed.get_rank(), torch.distributed.get_world_size()


def print0(*a, **k):
    """Print on rank 0 only; every message of the run goes through here."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(*a, **k, flush=True)


def all_sum(values, device):
    """Sum a list of Python numbers over all ranks, element by element."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def pick_dtype(name, device):
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"  # PyTorch's CPU kernels all support bf16; fast where the CPU has AVX512-BF16/AMX


def deepspeed_config(args, world, dtype):
    with open(args.ds_config, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["train_micro_batch_size_per_gpu"] = args.batch_size
    cfg["gradient_accumulation_steps"] = args.grad_accum
    cfg["train_batch_size"] = args.batch_size * args.grad_accum * world
    if args.zero_stage is not None:
        cfg.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    cfg.setdefault("bf16", {})["enabled"] = dtype == "bf16"
    cfg.setdefault("fp16", {})["enabled"] = dtype == "fp16"
    return cfg


def lr_lambda(warmup, total):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def load_tokenizer(args, records):
    if args.tokenizer:
        return Tokenizer.load(args.tokenizer)
    texts = [m["content"] for r in records for m in r["messages"]]
    train = Tokenizer.train_spm if args.tokenizer_trainer == "spm" else Tokenizer.train
    return train(texts, args.vocab_size)  # deterministic: every rank trains the same one


def main(args):
    t_start = time.time()
    device, rank, world = setup_distributed()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    run_dir = args.out or os.path.join(HERE, "runs", time.strftime("%Y%m%d-%H%M%S"))

    # ---- data: validate, tokenize, render
    records = load_jsonl(args.data)
    if args.init_from:
        model, tok = load_model(args.init_from, attn_impl=args.attn_impl)
        model.train()
    else:
        model, tok = None, load_tokenizer(args, records)
    template = ChatTemplate(tok)
    row_len = args.max_seq_len + 1  # +1: inputs and targets are the row shifted by one
    samples, too_long = tokenize(records, template, row_len)
    print0(f"data: {len(samples)} conversations from {args.data}, vocab {tok.vocab_size}"
           + (f"; {too_long} longer than {row_len} tokens left out" if too_long else ""))
    if not samples:
        raise SystemExit(f"{args.data}: no conversation fits in --max-seq-len {args.max_seq_len}")
    val = None
    if args.val_data:
        val_samples, val_too_long = tokenize(load_jsonl(args.val_data), template, row_len)
        print0(f"validation: {len(val_samples)} conversations from {args.val_data}"
               + (f"; {val_too_long} longer than {row_len} tokens left out" if val_too_long else ""))
        val = shard(pack(val_samples, row_len, template.pad), rank, world, template.pad)
    evals = load_jsonl(args.eval_data, check_eval_record) if args.eval_data else []

    # ---- model and deepspeed
    dtype = pick_dtype(args.dtype, device)
    if model is None:
        model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=args.dim, n_layer=args.n_layer,
                                        n_head=args.n_head, n_kv_head=args.n_kv_head,
                                        max_seq_len=args.max_seq_len, attn_impl=args.attn_impl))
    cfg = model.cfg
    if args.max_seq_len > cfg.max_seq_len:
        raise ValueError(f"--max-seq-len {args.max_seq_len} exceeds the model's {cfg.max_seq_len} positions")
    n_params = model.num_params()  # counted now: under ZeRO-3 the module's own tensors become empty shards
    rows = epoch_rows(samples, row_len, template.pad, args.seed, 0, rank, world)  # epoch 0, reshuffled each epoch
    steps_per_epoch = len(rows["ids"]) / (args.batch_size * args.grad_accum)
    total_steps = args.steps or max(math.ceil(args.epochs * steps_per_epoch), 1)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # no weight decay on norms
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup_steps, total_steps))
    ds_cfg = deepspeed_config(args, world, dtype)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    print0(f"model: {n_params:,} parameters, {dtype}, ZeRO stage {engine.zero_optimization_stage()}, "
           f"{world} rank(s) on {device.type}; {total_steps} steps of {ds_cfg['train_batch_size']} rows x {row_len} tokens")

    def val_loss():
        if val is None:
            return float("nan"), float("nan")
        engine.eval()
        s, c = validation_loss(engine, val, args.batch_size)
        engine.train()
        return loss_and_ppl(*all_sum([s, c], device))

    before_loss, _ = val_loss()
    if val is not None:
        print0(f"step 0: val loss {before_loss:.4f}")

    # ---- training
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        log_file = open(os.path.join(run_dir, "train_log.csv"), "w", newline="")
        log = csv.writer(log_file)
        log.writerow(["step", "loss", "lr", "tokens", "supervised_tokens", "tokens_per_s", "elapsed_s"])
    epoch, cursor = 0, 0
    tokens = sup_tokens = 0
    pad_fracs = [padding_fraction(rows)]
    t_train = time.time()
    for step in range(1, total_steps + 1):
        # the micro-batches of this optimizer step
        micro = []
        for _ in range(args.grad_accum):
            if cursor + args.batch_size > len(rows["ids"]):
                # the rows this epoch has left go first in the next one: none is skipped
                epoch = epoch + 1
                fresh = epoch_rows(samples, row_len, template.pad, args.seed, epoch, rank, world)
                pad_fracs.append(padding_fraction(fresh))
                rows = {k: np.concatenate([v[cursor:], fresh[k]]) for k, v in rows.items()}
                cursor = 0
            micro.append(to_batch(rows, slice(cursor, cursor + args.batch_size)))
            cursor += args.batch_size
        # NOTE: normalise by the supervised tokens of the whole global batch (all micro-batches,
        # all ranks). deepspeed divides each backward by grad_accum and averages gradients over
        # ranks, so multiplying by grad_accum * world undoes both and every token weighs the same.
        n_sup, n_tok = all_sum([sum(b["loss_mask"].sum() for b in micro),
                                sum((b["doc"] >= 0).sum() for b in micro)], device)
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        step_nll = 0.0
        for b in micro:
            b = {k: v.to(device) for k, v in b.items()}
            logits = engine(b["idx"], pos=b["pos"], doc=b["doc"])
            s, _ = masked_nll(logits, b["targets"], b["loss_mask"])
            engine.backward(s * (args.grad_accum * world) / max(n_sup, 1.0))
            engine.step()
            step_nll += s.item()
        tokens, sup_tokens = tokens + int(n_tok), sup_tokens + int(n_sup)
        loss = all_sum([step_nll], device)[0] / max(n_sup, 1.0)
        elapsed = time.time() - t_train
        if rank == 0:
            log.writerow([step, f"{loss:.5f}", f"{lr:.6g}", tokens, sup_tokens,
                          f"{tokens / elapsed:.1f}", f"{elapsed:.2f}"])
        if step % args.log_every == 0 or step == total_steps:
            if rank == 0:
                log_file.flush()
            print0(f"step {step}/{total_steps}  loss {loss:.4f}  lr {lr:.2e}  "
                   f"{tokens / elapsed:,.0f} tok/s  {elapsed:.0f}s")
    train_time = time.time() - t_train
    if rank == 0:
        log_file.close()

    # ---- evaluate and save
    after_loss, after_ppl = val_loss()
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # gathers the shards; all ranks take part
    else:
        state = engine.module.state_dict()
    if rank == 0:
        save_model(run_dir, state, cfg, tok)
        scores = {}
        if evals:  # exact match of the saved weights, in fp32: what chat.py will load
            final, _ = load_model(run_dir, device)
            scores, _ = exact_match(final, template, evals)
        write_json(os.path.join(run_dir, "ds_config.json"), ds_cfg)
        metrics = {"val_loss": after_loss, "val_ppl": after_ppl, "val_loss_before": before_loss,
                   "exact_match": scores, "train_tokens_per_s": tokens / train_time,
                   "wall_time_s": time.time() - t_start, "train_time_s": train_time, "steps": total_steps,
                   "tokens": tokens, "supervised_tokens": sup_tokens, "params": n_params,
                   "dtype": dtype, "world_size": world, "padding_fraction": float(np.mean(pad_fracs)),
                   "conversations_too_long": too_long}
        write_json(os.path.join(run_dir, "metrics.json"), metrics)
        point_latest(run_dir)
        if val is not None:
            print0(f"val loss {before_loss:.4f} -> {after_loss:.4f} (ppl {after_ppl:.3f})")
        if scores:
            print0(f"held-out exact match: {format_scores(scores)}")
        print0(f"saved {run_dir} in {metrics['wall_time_s']:.0f}s; chat with: python chat.py --ckpt {run_dir}")
    torch.distributed.barrier()


if __name__ == "__main__":
    args = parse_args()
    try:
        main(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: the message names file, line, reason
        raise SystemExit(f"error: {e}")
