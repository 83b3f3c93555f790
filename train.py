"""
Supervised fine-tuning, through DeepSpeed. One process on a laptop CPU by default:

    python train.py                                   # the default run on data/train.jsonl
    deepspeed --num_gpus 2 train.py --zero-stage 2    # the same script on 2 GPUs (or 2 CPU ranks)
    python train.py --out runs/x --save-every 200     # checkpoints to resume from (Ctrl-C saves one too) ...
    python train.py --out runs/x --resume             # ... after a crash, a kill or a Ctrl-C
    python train.py --stage reward --init-from runs/x --data pairs.jsonl   # a reward model, from an SFT run
    python train.py --stage dpo --init-from runs/x --data pairs.jsonl      # DPO on the same pairs
    python train.py --stage ppo --init-from runs/x --reward-model runs/rm --data prompts.jsonl  # PPO
    python train.py --stage grpo --init-from runs/x --data prompts.jsonl   # GRPO, exact match as reward

The story, in the order of main(): read and validate the chat data, train (or load) the tokenizer,
render and pack the conversations -> build the model -> deepspeed.initialize (ZeRO stage, offload,
bf16/fp16, gradient clipping) -> the loop: train_step after train_step, with the masked SFT loss
normalised by the supervised tokens of the whole global batch -> evaluate (validation loss,
held-out exact match and BLEU) -> save the run directory (nanosft/checkpoint.py). The plumbing:
nanosft/train_args.py (flags, --resume), cache.py, distributed.py (DeepSpeed), monitor.py, memory.py.
The preference stages (--stage reward|dpo) run the same story on pairs of replies, a step being
preference.py's pair_step (reward.py's loss or dpo.py's) and evaluation the held-out pairs' metrics.
The RL stages (--stage ppo|grpo) run it on prompts, a step being rlhf.py's rl_step: a rollout of
the policy's own replies, then ppo.py's clipped updates (and, with --ema, ema.py's average).
"""

import copy
import faulthandler
import math
import os
import random
import shutil
import signal
import sys
import time
from types import SimpleNamespace

import deepspeed
import numpy as np
import torch

from nanosft.adapter import save_adapter
from nanosft.cache import load_data
from nanosft.checkpoint import describe_path, load_model, load_reward_model, point_latest, save_model, save_tokenizer
from nanosft.data import Batches, IndexBatches, PairBatches
from nanosft.distributed import (all_sum, checkpoint_tag, current_loss_scale, deepspeed_config, fp32_weights,
                                 full_state_dict, inference_config, load_checkpoint, lr_factor, lr_schedule,
                                 make_optimizer, param_groups, print0, rng_state, save_checkpoint, set_rng_state,
                                 setup_distributed, with_muon)
from nanosft.ema import EMA
from nanosft.evaluate import brief, format_samples, generation_metrics, loss_and_ppl, pick_samples, table, validation_loss
from nanosft.interrupt import StopRequest, save_and_exit
from nanosft.lora import add_lora
from nanosft.machine import choose_threads, cpu_name, free_memory, pick_dtype, using_threads
from nanosft.files import atomic_write, write_json
from nanosft.memory import check_fits, least_free, record_memory
from nanosft.model import Transformer
from nanosft.monitor import MONITOR_DIR, log_events, trim_monitor
from nanosft.plot import plot_run
from nanosft.preference import STAGES as PAIR_STAGES, pair_metrics_from, pair_step, pair_sums, reference_logps
from nanosft.progress import Progress, clock
from nanosft.quantize import quantization
from nanosft.reward import RewardModel, ValueModel
from nanosft.rlhf import STAGES as RL_STAGES, answer_scores, rl_step
from nanosft.train_args import HERE, model_config, parse_args


def train_step(engine, micro, world, device, before_step=None):
    """Forward and backward over this rank's micro-batches, then the optimizer step (before which
    `before_step()` is called, if given). Returns the summed NLL, supervised tokens, real tokens
    and token slots computed (real + padding) of the whole global batch.

    NOTE: the loss is normalised by the supervised tokens of the whole global batch (all
    micro-batches, all ranks). DeepSpeed divides each backward by the number of micro-batches and
    averages gradients over the ranks, so multiplying by len(micro) * world undoes both: every
    supervised token weighs the same, however the global batch is split (tests/test_zero.py)."""
    n_sup, n_tok, n_slots = all_sum([sum(b["loss_mask"].sum() for b in micro), sum((b["doc"] >= 0).sum() for b in micro),
                                     sum(b["doc"].numel() for b in micro)], device)
    nll = 0.0
    for i, b in enumerate(micro):
        b = {k: v.to(device) for k, v in b.items()}
        s, _ = engine(b["idx"], pos=b["pos"], doc=b["doc"], targets=b["targets"], loss_mask=b["loss_mask"])
        engine.backward(s * (len(micro) * world) / max(n_sup, 1.0))
        if before_step and i == len(micro) - 1:
            before_step()
        engine.step()  # only the last micro-batch's call steps the optimizer
        nll += s.item()
    return all_sum([nll], device)[0], n_sup, n_tok, n_slots


def train(run, start, evaluate):
    """The loop, from the step after `start["step"]` to run.total_steps: a train_step each, logged;
    evaluations at epoch ends and every --eval-every steps; a checkpoint every --save-every, and one
    to stop at after Ctrl-C or SIGTERM (run.stop). `run` is what main() has set up.
    -> what was counted: the last step, tokens, supervised tokens, token slots, seconds."""
    args, engine, batches = run.args, run.engine, run.batches
    progress = Progress(run.total_steps, args.log_every, live=False if args.quiet else None) if run.rank == 0 else None
    show = progress.note if progress else (lambda text: None)
    tokens, sup_tokens, slots, t0, step = start["tokens"], start["supervised_tokens"], 0, time.time(), start["step"]
    for step in range(start["step"] + 1, run.total_steps + 1):
        epochs_done = batches.epoch + batches.epoch_done  # an epoch may end in the middle of a step
        micro = [batches.next() for _ in range(args.grad_accum)]
        sft = [run.sft_batches.next() for _ in range(args.grad_accum)] if run.sft_batches else None
        lr = (args.lora_rank and args.lora_lr or args.lr) * lr_factor(engine)  # the rate this step uses (the adapters')
        # memory is measured at the second step: the optimizer's state appears at the first
        measure = (lambda: record_memory(engine, args, run.n_params, run.world, run.dir, show,
                                         run.n_trainable)) if step == 2 else None
        if args.stage in RL_STAGES:  # (n_sup counts replies here)
            loss, n_sup, n_tok, n_slots, extra = rl_step(run, [run.prompts[i] for b in micro for i in b], step, measure,
                                                         sft)
            if run.ema:
                run.ema.update(engine)
        elif args.stage in PAIR_STAGES:  # (n_sup counts pairs here)
            loss, n_sup, n_tok, n_slots, extra = pair_step(engine, micro, run.world, run.device, args.stage, run.ref,
                                                           run.pair_settings, measure, sft, args.sft_coef)
        else:
            nll, n_sup, n_tok, n_slots = train_step(engine, micro, run.world, run.device, measure)
            loss, extra = nll / max(n_sup, 1.0), {}
        tokens, sup_tokens, slots = tokens + int(n_tok), sup_tokens + int(n_sup), slots + int(n_slots)
        seconds, scale = time.time() - t0, current_loss_scale(engine)
        tok_per_s, elapsed = (tokens - start["tokens"]) / seconds, start["elapsed_s"] + seconds
        log_events(engine, step, "Train", loss=loss, lr=lr, tokens=tokens, supervised_tokens=sup_tokens,
                   tokens_per_s=tok_per_s, elapsed_s=elapsed, skipped_steps=engine.skipped_steps, loss_scale=scale,
                   **extra)
        if progress:
            progress.update(step, loss, lr, tok_per_s, elapsed, seconds / (step - start["step"]) * (run.total_steps - step))
            if engine.skipped_steps and step % args.log_every == 0:
                show(f"step {step}: {engine.skipped_steps} step(s) skipped so far (fp16 overflow), loss scale {scale:g}")
        # an epoch end is evaluated when epochs last --eval-every steps or more (not every few steps
        # on tiny data), and not in the last 1% of the run (the final evaluation is near); a stop
        # asked of any rank is every rank's
        ended, stop = all_sum([batches.epoch + batches.epoch_done > epochs_done, run.stop.signum is not None], run.device)
        epoch_end = ended > 0 and run.epoch_evals and run.total_steps - step > run.total_steps // 100
        if step < run.total_steps and (epoch_end or (args.eval_every and step % args.eval_every == 0)):
            m, _ = evaluate(step, generation=epoch_end)
            if m:
                show(f"step {step}{' (end of epoch)' if epoch_end else ''}: {brief(m)}")
        if stop or (args.save_every and step % args.save_every == 0 and step < run.total_steps):
            if run.critic:  # first: a run killed between the two resumes from the actor's step
                save_checkpoint(run.critic, os.path.join(run.ckpt_dir, "critic"), step, client_state={},
                                keep=args.keep_checkpoints)
            if run.ema and run.rank == 0:  # (beside the actor's, before `latest` names it)
                run.ema.save(os.path.join(run.ckpt_dir, checkpoint_tag(step), "ema.safetensors"))
            save_checkpoint(engine, run.ckpt_dir, step, keep=args.keep_checkpoints, client_state=dict(
                step=step, batches=batches.state_dict(), tokens=tokens, supervised_tokens=sup_tokens, elapsed_s=elapsed,
                before=run.before, before_replies=run.before_replies, world_size=run.world, rng=rng_state(),
                sft_batches=run.sft_batches.state_dict() if run.sft_batches else None))
        if stop:
            break
    if progress:
        progress.close()
    return {"step": step, "tokens": tokens, "supervised_tokens": sup_tokens, "slots": slots, "seconds": time.time() - t0}


def main(args):
    t_start = time.time()
    device, rank, world = setup_distributed()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    run_dir = [args.out or os.path.join(HERE, "runs", time.strftime("%Y%m%d-%H%M%S"))]
    torch.distributed.broadcast_object_list(run_dir, src=0)  # rank 0's clock names it for all
    # filled in below: engine, batches, total_steps, n_params (start_engine); before, before_replies (step 0)
    run = SimpleNamespace(args=args, device=device, rank=rank, world=world, dir=run_dir[0],
                          ckpt_dir=os.path.join(run_dir[0], "checkpoints"))

    # ---- data, tokenizer and model
    model, tok = load_model(args.init_from, attn_impl=args.attn_impl) if args.init_from else (None, None)
    if model and quantization(model):  # integers and scales have no gradients
        raise ValueError(f"--init-from {args.init_from} is quantized ({quantization(model)['method']}); "
                         "train from the model it came from")
    data = load_data(args, run.dir, rank, world, tok)
    if model and data.tok.vocab_size > tok.vocab_size:  # --chat-format's markers, new to the model's vocabulary
        model.add_token_rows(tok.vocab_size, data.tok.vocab_size)
    model = model.train() if model else Transformer(model_config(args, data.tok.vocab_size))
    # the reference as a model of its own (DPO's --reference live, PPO, GRPO): the starting weights, before LoRA
    live = args.reference == "live" or args.stage in RL_STAGES
    run.frozen = copy.deepcopy(model).eval().requires_grad_(False) if live else None
    model.grad_checkpointing = args.gradient_checkpointing
    if args.lora_rank:  # the model frozen, adapters on the chosen projections (nanosft/lora.py)
        add_lora(model, args.lora_targets.split(","), args.lora_rank, args.lora_alpha, args.lora_dropout)
    if args.stage == "reward":  # a score head instead of the LM head, trained (with LoRA too) from zero
        model = RewardModel(model)
    if args.max_seq_len > model.cfg.max_seq_len:
        raise ValueError(f"--max-seq-len {args.max_seq_len} exceeds the model's {model.cfg.max_seq_len} positions")

    # ---- deepspeed.initialize, then start (or pick up where a checkpoint left off)
    engine, ds_cfg = start_engine(run, model, data)
    _, run.decode_threads, why = choose_threads(engine.module, args.batch_size, args.max_seq_len, args.threads, world,
                                                decodes=args.stage != "reward")
    print0(f"machine: {cpu_name()}, {why}")
    run.ref = run.val_ref = None
    run.pair_settings = (dict(center=args.center_rewards) if args.stage == "reward" else
                         dict(beta=args.beta, label_smoothing=args.label_smoothing, rpo_alpha=args.rpo_alpha))
    if args.stage == "dpo":
        reference(run, data, ds_cfg)
    run.critic = None
    if args.stage in RL_STAGES:
        rl_models(run, data, ds_cfg)
    run.ema = EMA(engine, args.ema) if args.ema else None
    evaluate = evaluator(run, data)
    start = {"step": 0, "tokens": 0, "supervised_tokens": 0, "elapsed_s": 0.0}
    if args.resume:
        start = load_checkpoint(engine, run.ckpt_dir)
        if start["world_size"] != world:
            raise ValueError(f"{run.ckpt_dir}: the run used {start['world_size']} rank(s), not {world}: "
                             "the data order depends on it; resume with the same launcher settings")
        run.batches.load_state_dict(start["batches"])
        if run.critic:  # (the critic's checkpoint of the same step: one saved later may exist, from a killed save)
            load_checkpoint(run.critic, os.path.join(run.ckpt_dir, "critic"), tag=checkpoint_tag(start["step"]))
        if run.sft_batches:
            run.sft_batches.load_state_dict(start["sft_batches"])
        if run.ema:
            run.ema.load(os.path.join(run.ckpt_dir, checkpoint_tag(start["step"]), "ema.safetensors"))
        set_rng_state(start["rng"])
        run.before, run.before_replies = start.get("before", {}), start.get("before_replies")  # (older ones lack them)
        trim_monitor(engine, run.dir, start["step"], ds_cfg["train_batch_size"])
        print0(f"resumed {run.dir} at step {start['step']} (epoch {run.batches.epoch})")
    else:
        t_eval = time.time()
        run.before, run.before_replies = evaluate(0, generation=True)
        if run.before:
            print0(f"step 0: {brief(run.before)} ({time.time() - t_eval:.1f}s)")
    if rank == 0:
        os.makedirs(run.dir, exist_ok=True)
        write_json(os.path.join(run.dir, "args.json"),
                   {k: v for k, v in vars(args).items() if k not in ("ds_base", "resume", "local_rank")})
        write_json(os.path.join(run.dir, "ds_config.json"), ds_cfg)
        save_tokenizer(run.dir, data.tok, model.cfg)  # (with the chat format: a resumed run renders as this one)

    # ---- train, evaluate, save
    run.stop = StopRequest()  # Ctrl-C and SIGTERM now finish the step, then save (nanosft/interrupt.py)
    counted = train(run, start, evaluate)
    if run.stop.signum:
        save_and_exit(engine, run.dir, model.cfg, data.tok, counted["step"], run.stop.signum, world)
    weights = fp32_weights(engine)  # fp32, gathered from the shards once: every rank takes part, rank 0 keeps it
    state, adapters = full_state_dict(engine, weights)
    after, after_replies = evaluate(run.total_steps, generation=True, state=state)  # the weights being saved
    ema_state = full_state_dict(engine, weights, replace=run.ema.shadow)[0] if run.ema else None  # (merged too)
    run.ema_after = evaluate(run.total_steps, generation=True, state=ema_state, log=False)[0] if run.ema else None
    if rank == 0:
        save_model(run.dir, state, model.cfg, data.tok)  # (with LoRA: merged)
        if ema_state:
            save_model(os.path.join(run.dir, "ema"), ema_state, model.cfg, data.tok)
        if adapters and args.stage != "reward":  # and the adapters alone, in PEFT's format
            save_adapter(run.dir, adapters, engine.module, args.init_from)
        finish(run, data, start, counted, after, after_replies, time.time() - t_start)
    torch.distributed.barrier()  # (the process group is left in __main__'s finally)


def start_engine(run, model, data):
    """The batches, the step count, and deepspeed.initialize around model, optimizer and schedule
    (kept in `run`). -> (engine, the DeepSpeed config it runs with)."""
    args = run.args
    args.dtype, dtype_why = pick_dtype(args.dtype, run.device, model.cfg.dim)
    # counted now: under ZeRO-3 the module's own tensors become empty shards (tied ones count once)
    run.n_params = sum(p.numel() for p in model.parameters())
    run.n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    pairs = args.stage in PAIR_STAGES
    rl = args.stage in RL_STAGES  # (rows: a prompt and the reply a rollout writes, up to --max-seq-len)
    tight = check_fits(model.cfg, run.n_params, args.batch_size, args.grad_accum,
                       args.max_seq_len if rl else data.row_len - 1, args.dtype,
                       args.zero_stage, run.world, args.gradient_checkpointing, least_free(free_memory(run.device)),
                       offload=args.offload if run.device.type == "cuda" else "none",  # not the OS killing it later
                       n_trainable=run.n_trainable, rows_per_item=(2 + bool(data.sft_samples)) if pairs else
                       args.group if args.stage == "grpo" else 1,
                       logits=args.stage in ("dpo",) + RL_STAGES)
    if tight:
        print0(tight)
    if (pairs or rl) and len(data.samples) < run.world:
        raise ValueError(f"{len(data.samples)} {'preference pair' if pairs else 'prompt'}(s) for {run.world} ranks: "
                         "every rank needs one at least")
    if args.stage in RL_STAGES:  # a micro-batch of --batch-size prompts (GRPO: --group replies each)
        run.batches = IndexBatches(data.samples, args.batch_size, args.seed, run.rank, run.world)
    elif pairs:  # a micro-batch of --batch-size pairs: twice as many rows
        run.batches = PairBatches(data.samples, data.template.pad, args.batch_size, args.seed, run.rank, run.world)
    else:
        run.batches = Batches(data.samples, data.row_len, data.template.pad, args.batch_size, args.seed, run.rank,
                              run.world, args.packing == "on")
    # --sft-data's conversations, unpacked (a micro-batch of them as long as its longest, like the pairs')
    run.sft_batches = (Batches(data.sft_samples, args.max_seq_len + 1, data.template.pad, args.batch_size, args.seed,
                               run.rank, run.world, packing=False) if data.sft_samples else None)
    steps_per_epoch = run.batches.rows_per_epoch / (args.batch_size * args.grad_accum)
    run.total_steps = args.steps or max(math.ceil(args.epochs * steps_per_epoch), 1)
    run.epoch_evals = steps_per_epoch >= args.eval_every
    if args.warmup_steps > run.total_steps:
        print0(f"note: --warmup-steps {args.warmup_steps} is longer than the run's {run.total_steps} steps: the "
               f"learning rate never reaches --lr {args.lr:g}")
    if steps_per_epoch < 1:  # every step then sees some conversations more than once
        print0(f"note: one step takes {1 / steps_per_epoch:.1f} epochs of this data ({run.batches.rows_per_epoch} rows "
               f"per epoch per rank, {args.batch_size * args.grad_accum} per step): lower --batch-size or --grad-accum")
    ds_cfg = deepspeed_config(args.ds_base, world=run.world, micro_batch=args.batch_size, grad_accum=args.grad_accum,
                              zero_stage=args.zero_stage, offload=args.offload, dtype=args.dtype,
                              grad_clip=args.grad_clip, pin_memory=run.device.type == "cuda", log_dir=run.dir,
                              tensorboard=args.tensorboard)
    if run.rank == 0 and not args.resume:  # a new run in an old run's directory: its logs start afresh
        if os.path.exists(os.path.join(run.dir, "args.json")):
            print0(f"note: {run.dir} holds an earlier run, which this one replaces (--resume would continue it)")
        for folder in (MONITOR_DIR, "tensorboard"):
            shutil.rmtree(os.path.join(run.dir, folder), ignore_errors=True)
    if args.optimizer == "muon":  # DeepSpeed builds it from the config, then the schedule around it
        ds_cfg = with_muon(ds_cfg, args.lr, args.muon_lr)
        optimizer, scheduler = None, lambda opt: lr_schedule(opt, args.warmup_steps, run.total_steps)
    else:
        optimizer = make_optimizer(model, args.lr, args.weight_decay, args.offload, args.lora_lr)
        # (PPO and GRPO step the optimizer --ppo-epochs times a training step)
        scheduler = lr_schedule(optimizer, args.warmup_steps,
                                run.total_steps * (args.ppo_epochs if args.stage in RL_STAGES else 1))
    if not args.compile:
        # nothing is compiled, DeepSpeed's own torch.compile calls included: the one around Muon's
        # Newton-Schulz step cost ~25 s of compiling at start-up and ran ~20% slower than eager
        # (2-core AMD EPYC, default run)
        torch.compiler.set_stance("force_eager")
    run.engine = engine = deepspeed.initialize(model=model, model_parameters=param_groups(model, args.weight_decay,
                                                                                          args.lora_lr),
                                               optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)[0]
    if args.compile:
        # Packed rows all have one shape, so the training step compiles once (with --packing off, a
        # second compilation covers every length). Evaluation runs eagerly (see evaluator): its
        # batches have other shapes and no backward pass, and would only cost more compilations.
        engine.compile()
    print0(f"model: {run.n_params:,} parameters"
           + (f" ({run.n_trainable:,} trained: LoRA rank {args.lora_rank})" if args.lora_rank else "")
           + f", {args.optimizer}, {args.dtype} ({dtype_why}), "
           f"ZeRO stage {args.zero_stage}"
           + (f" offload {args.offload}" if args.offload != "none" else "") + f", {run.world} rank(s) on "
           f"{run.device.type}; {run.total_steps} steps of {ds_cfg['train_batch_size']} "
           + (f"pairs of rows up to {data.row_len} tokens" if pairs else f"rows x {data.row_len} tokens")
           + (f"; from {describe_path(args.init_from)}" if args.init_from else ""))
    return engine, ds_cfg


def reference(run, data, ds_cfg):
    """DPO's reference: the log-probabilities of every training and held-out pair's replies under
    the model as it starts (preference.reference_logps), in run.ref and run.val_ref. Kept in the
    run directory too, where a resumed run, whose model has moved on, reads them back. With
    --reference live, run.ref and run.val_ref are instead the frozen starting model itself, under
    DeepSpeed beside the policy (ds_cfg: the policy's config)."""
    args, engine = run.args, run.engine
    if run.frozen is not None:  # --reference live: the frozen copy scores every batch itself
        cfg = inference_config(ds_cfg)
        run.ref = run.val_ref = deepspeed.initialize(model=run.frozen, config=cfg)[0]
        print0(f"reference: a frozen copy of the starting model (ZeRO stage {cfg['zero_optimization']['stage']})")
        return
    path = os.path.join(run.dir, "reference_logps.npz")
    if args.resume:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: the run's reference log-probabilities are lost")
        with np.load(path, allow_pickle=False) as z:
            if (len(z["train"]), len(z["val"])) != (len(data.samples), len(data.val_pairs)):
                raise ValueError(f"{path}: the reference log-probabilities of {len(z['train'])} + {len(z['val'])} pairs, "
                                 f"the data now {len(data.samples)} + {len(data.val_pairs)}: the pair files changed "
                                 "since the run started")
            run.ref, run.val_ref = (torch.from_numpy(z[k]).to(run.device) if z[k].size else None for k in ("train", "val"))
        return
    t0 = time.time()
    engine.eval()
    with torch.compiler.set_stance("force_eager"):  # (no compilation for these shapes, as in evaluation)
        run.ref, run.val_ref = (reference_logps(engine, samples, data.template.pad, args.batch_size, run.rank,
                                                run.world, run.device) if samples else None
                                for samples in (data.samples, data.val_pairs))
    engine.train()
    if run.rank == 0:
        os.makedirs(run.dir, exist_ok=True)
        with atomic_write(path, "wb") as f:
            np.savez(f, train=run.ref.cpu().numpy(), val=(run.val_ref.cpu().numpy() if run.val_ref is not None
                                                          else np.zeros((0, 2), np.float32)))
    print0(f"reference log-probabilities of {len(data.samples) + len(data.val_pairs)} pairs ({time.time() - t0:.1f}s)")


def rl_models(run, data, ds_cfg):
    """--stage ppo|grpo: the reference (the frozen starting model, as reference() sets it up), and
    for PPO the reward model (frozen) and the critic, started from it and trained by a DeepSpeed
    engine of its own (the policy's settings, --critic-lr)."""
    args = run.args
    run.template, run.prompts = data.template, data.samples
    reference(run, data, ds_cfg)
    if args.stage != "ppo":
        return
    rm, rm_tok = load_reward_model(args.reward_model)
    policy_vocab = run.engine.module.cfg.vocab_size
    if rm_tok.to_bytes() != data.tok.to_bytes() or rm.cfg.vocab_size != policy_vocab:
        raise ValueError(f"{args.reward_model}: the reward model's tokenizer or vocabulary ({rm.cfg.vocab_size} rows) "
                         f"is not the policy's ({policy_vocab} rows): train it from the same model "
                         f"(--stage reward --init-from {args.init_from})")
    critic = ValueModel.from_reward_model(copy.deepcopy(rm)).train().requires_grad_(True)
    run.reward = deepspeed.initialize(model=rm.requires_grad_(False), config=inference_config(ds_cfg))[0]
    run.reward_norm = answer_scores(run) if args.reward_norm == "answers" else (0.0, 1.0)
    critic.score.weight.data /= run.reward_norm[1]  # its first values in the rewards' units
    optimizer = make_optimizer(critic, args.critic_lr or args.lr, args.weight_decay, args.offload)
    quiet = {k: v for k, v in ds_cfg.items() if k not in ("csv_monitor", "tensorboard")}  # the actor logs the run
    run.critic = deepspeed.initialize(model=critic, model_parameters=param_groups(critic, args.weight_decay),
                                      optimizer=optimizer, config=quiet,
                                      lr_scheduler=lr_schedule(optimizer, args.warmup_steps,
                                                               run.total_steps * args.ppo_epochs))[0]
    print0(f"reward model and critic: {describe_path(args.reward_model)}; its scores "
           + ("as they are" if args.reward_norm == "none" else "normalized by its scores of the data's answers: "
              "(score - {:.3f}) / {:.3f}".format(*run.reward_norm)))


def evaluator(run, data):
    """-> evaluate(step, generation, state=None) -> (metrics, replies), both rank 0's business:
    validation loss (every rank scores its shard) and, if asked, generation metrics: rank 0 answers
    the held-out prompts with the fp32 master weights, the model a checkpoint saves (`state` when
    the caller has gathered them already). NOTE: meanwhile the other ranks wait at their next
    collective; with sharded or offloaded weights (ZeRO-3, --offload) the copy stays in CPU memory."""
    args, engine = run.args, run.engine

    def evaluate(step, generation, state=None, log=True):
        m, replies = {}, None
        if data.val is not None:
            engine.eval()
            with torch.compiler.set_stance("force_eager"):  # no compilation for these shapes (--compile)
                nll = all_sum(validation_loss(engine, data.val, args.batch_size), run.device)
                m["val_loss"], m["val_ppl"] = loss_and_ppl(*nll)
            engine.train()
        if data.val_pairs:  # held-out pairs: loss, the share ranked right, mean rewards (preference.py)
            engine.eval()
            with torch.compiler.set_stance("force_eager"):
                m.update(pair_metrics_from(all_sum(pair_sums(engine, data.val_pairs, data.template.pad, args.batch_size,
                                                             run.rank, run.world, run.device, args.stage, run.val_ref,
                                                             run.pair_settings), run.device)))
            engine.train()
        if generation and data.evals and args.stage != "reward":  # (a reward model scores, it does not write)
            if state is None:
                state = full_state_dict(engine)[0]  # every rank takes part in the gather
            if run.rank == 0:
                snapshot = Transformer(engine.module.cfg)
                snapshot.load_state_dict(state)
                on = run.device if args.zero_stage < 3 and args.offload == "none" else torch.device("cpu")
                with using_threads(run.decode_threads):
                    scores, replies = generation_metrics(snapshot.to(on).eval(), data.template, data.evals)
                m.update(scores)
        if log:
            log_events(engine, step, "Eval", val_loss=m.get("val_loss"), val_ppl=m.get("val_ppl"),
                       exact_match=m.get("exact_match", {}).get("overall"), bleu=m.get("bleu"),
                       **{k: m.get(k) for k in ("pair_loss", "pair_accuracy", "reward_margin")})
        return m, replies
    return evaluate


def finish(run, data, start, counted, after, after_replies, wall_time):
    """Rank 0, after saving the weights: metrics.json, runs/latest, loss.png, and the report."""
    args, before = run.args, run.before
    replies = {"step 0": run.before_replies, "trained": after_replies}
    samples = pick_samples(data.evals, {k: v for k, v in replies.items() if v is not None}) if data.evals else []
    tokens = counted["tokens"] - start["tokens"]  # this session's
    metrics = {"val_loss": after.get("val_loss", math.nan), "val_ppl": after.get("val_ppl", math.nan),
               "val_loss_before": before.get("val_loss", math.nan), "exact_match": after.get("exact_match", {}),
               "bleu": after.get("bleu"), "bleu_tokenize": after.get("bleu_tokenize"), "before": before,
               "after": after, "samples": samples, "train_tokens_per_s": tokens / counted["seconds"],
               "wall_time_s": wall_time, "train_time_s": counted["seconds"], "steps": run.total_steps,
               "skipped_steps": run.engine.skipped_steps, "tokens": counted["tokens"],
               "supervised_tokens": counted["supervised_tokens"], "params": run.n_params, "dtype": args.dtype,
               "zero_stage": args.zero_stage, "world_size": run.world,
               "padding_fraction": 1 - tokens / max(counted["slots"], 1),
               "invalid_records_skipped": sum(f.skipped for f in data.files),
               "conversations_truncated": data.counts["truncated"], "conversations_dropped": data.counts["dropped"]}
    if run.ema_after:  # --ema's average, saved in RUN/ema/
        metrics["ema"] = run.ema_after
    write_json(os.path.join(run.dir, "metrics.json"), metrics)
    point_latest(run.dir)
    try:
        plot_run(run.dir)
    except Exception as e:  # a picture is not worth losing the end of a run over
        print0(f"loss.png not drawn ({type(e).__name__}: {e}); try: python -m nanosft.plot {run.dir}")
    if samples:
        print0("sample conversations (held-out prompts):\n" + format_samples(samples, [k for k in replies if k in samples[0]]))
    if before or after:
        print0(table({"step 0": before, "trained": after, **({"ema": run.ema_after} if run.ema_after else {})}))
    print0(f"padding: {metrics['padding_fraction']:.1%} of the token positions computed")
    use = ("a reward model: transformers' AutoModelForSequenceClassification reads it" if args.stage == "reward"
           else f"chat with: python chat.py --ckpt {run.dir}")
    print0(f"saved {run.dir} ({clock(wall_time)}, loss curve in loss.png); {use}")


if __name__ == "__main__":
    # A crash in native code (a segfault, an abort) then prints every thread's Python stack instead of
    # dying silently: with several ranks, the only clue to which one failed and where.
    faulthandler.enable(all_threads=True)
    args = parse_args()
    try:
        main(args)
    except (ValueError, OSError) as e:  # bad input: the message names file, line and reason
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:  # before training started (nothing to save), or Ctrl-C twice
        print("\ninterrupted: nothing saved since the last checkpoint", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT)
    finally:  # an error too leaves the process group before the interpreter exits (gloo may abort otherwise)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
