"""
train.py's command line: the flags, where a setting comes from, the rules of --resume, and the
refusals. Everything here happens before train.py touches data or a model.

    args = parse_args()      flags -> settings, checked; p.error (exit 2, naming the flag) otherwise,
                             or an error exit 1 when --resume cannot continue the run

Where a setting comes from: the flag if given, else the DeepSpeed config (--ds-config, default
configs/ds_config.json) if it says, else CONFIG_DEFAULTS. A resumed run (--resume) takes every
setting from its args.json instead; flags given again must agree, except RESUME_MAY_CHANGE.
The model's own rules (heads that divide, ...) are ModelConfig's (model.py), reported in flag terms.
"""

import argparse
import importlib.util
import math
import os
import re

import torch

from nanosft.attention import ATTEND, VARIANTS
from nanosft.data import parse_source
from nanosft.distributed import config_settings
from nanosft.files import read_json
from nanosft.formats import FORMATS, PAIR_FORMATS
from nanosft.model import ModelConfig
from nanosft.preference import STAGES as PAIR_STAGES
from nanosft.rlhf import STAGES as RL_STAGES
from nanosft.template import TRAIN_ON
from nanosft.bpe import ByteLevelBPE
from nanosft.lora import expand_targets
from nanosft.template import FORMATS as CHAT_FORMATS
from nanosft.tokenizer import Tokenizer

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: train.py is there

# Settings a DeepSpeed config can also make. Precedence: the flag, else --ds-config, else these.
CONFIG_DEFAULTS = {"batch_size": 16, "grad_accum": 1, "zero_stage": 0, "offload": "none", "dtype": "auto",
                   "grad_clip": 1.0}
# Flags that may change when a run is resumed; any other must stay as the run started.
RESUME_MAY_CHANGE = {"resume", "out", "local_rank", "log_every", "save_every", "keep_checkpoints", "cache_dir",
                     "quiet", "tensorboard", "eval_every", "compile", "threads"}
PATH_FLAGS = {"val_data", "eval_data", "init_from", "tokenizer", "ds_config", "sft_data", "reward_model"}
# ModelConfig's fields as the flags that set them (check_args reports its errors in these terms)
FIELD_FLAGS = {"vocab_size": "--vocab-size", "max_seq_len": "--max-seq-len", "n_layer": "--n-layer",
               "n_head": "--n-head", "n_kv_head": "--n-kv-head", "dim": "--dim", "attn_impl": "--attn-impl"}


def build_parser():
    p = argparse.ArgumentParser(description="supervised fine-tuning of a chat model with DeepSpeed")
    _data_flags(p)
    _model_flags(p)
    _optimization_flags(p)
    _lora_flags(p)
    _preference_flags(p)
    _rl_flags(p)
    _deepspeed_flags(p)
    _run_flags(p)
    return p


def _data_flags(p):
    """What to train on, how to render and pack it, and the tokenizer."""
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", default=[os.path.join(HERE, "data/train.jsonl")], metavar="FILE[:WEIGHT]",
                   help="training data; several files are blended by weight (a.jsonl:0.7 b.json:0.3)")
    g.add_argument("--val-split", type=float, default=0.0,
                   help="hold out this fraction of each training file for validation (with or instead of --val-data)")
    g.add_argument("--val-data", default=None, help="validation data ('' for none; default data/val.jsonl, "
                   "none with --stage pretrain)")
    g.add_argument("--eval-data", default=None, help="held-out prompts with answers for exact match ('' for none; "
                   "default data/eval.jsonl, none with --stage pretrain)")
    g.add_argument("--stage", default="sft", choices=("sft", "pretrain") + PAIR_STAGES + RL_STAGES,
                   help="pretrain: plain text (.txt/.md files, or JSONL of {\"text\"}), loss on every token; "
                        "reward: a reward model, dpo: DPO, both on preference pairs and from --init-from's model; "
                        "ppo, grpo: reinforcement learning on chat data's prompts (nanosft/rlhf.py)")
    g.add_argument("--format", default="auto", choices=("auto",) + FORMATS + PAIR_FORMATS,
                   help="data format (auto: recognised per record by its keys; see nanosft/formats.py)")
    g.add_argument("--skip-invalid", action="store_true",
                   help="leave out invalid records (reported and counted) instead of stopping")
    g.add_argument("--train-on", default="all-assistant", choices=TRAIN_ON,
                   help="which assistant turns the loss covers; system and user turns never")
    g.add_argument("--packing", default="on", choices=["on", "off"],
                   help="on: several conversations share a row (document mask); off: a row each, grouped by length")
    g.add_argument("--cache-dir", default=os.path.join(HERE, "data", "cache"),
                   help="tokenized data and trained tokenizers, keyed by content hashes ('' for none)")
    g.add_argument("--max-seq-len", type=int, default=256, help="tokens per packed row (the context length); "
                   "longer conversations lose their oldest whole exchanges")
    g.add_argument("--init-from", default="", help="start from this run or Hugging Face Llama-family directory "
                   "(its model shape and tokenizer replace the model and tokenizer flags)")
    g.add_argument("--tokenizer", default="", help="a .model or tokenizer.json file (ours or a base model's: the chat "
                   "markers are added) or a directory holding one, to use instead of training one")
    g.add_argument("--tokenizer-kind", default="sentencepiece", choices=["sentencepiece", "bytelevel"],
                   help="the tokenizer trained on --data: SentencePiece-style BPE with byte fallback (tokenizer.py), "
                        "or GPT-style byte-level BPE (bpe.py, saved as tokenizer.json)")
    g.add_argument("--chat-format", default="auto", choices=("auto",) + CHAT_FORMATS,
                   help="how conversations are rendered: nanosft's markers, ChatML (Qwen, SmolLM2) or Llama 3's "
                        "headers (auto: the --init-from model's own chat template, else nanosft)")
    g.add_argument("--vocab-size", type=int, default=2000, help="vocabulary of the tokenizer trained on --data")
    g.add_argument("--tokenizer-trainer", default="nanosft", choices=["nanosft", "spm"],
                   help="train the tokenizer by hand (readable) or with the sentencepiece library (large corpora)")


def _model_flags(p):
    """The model's shape and attention (replaced by --init-from's)."""
    g = p.add_argument_group("model")
    g.add_argument("--n-layer", type=int, default=4)
    g.add_argument("--dim", type=int, default=128)
    g.add_argument("--n-head", type=int, default=4)
    g.add_argument("--n-kv-head", type=int, default=2, help="key/value heads (grouped-query attention)")
    g.add_argument("--attn", default=None, choices=sorted(VARIANTS),
                   help="an attention variant from nanosft/attention.py's VARIANTS (its fields win over the flags)")
    g.add_argument("--attn-impl", default="sdpa", choices=sorted(ATTEND),
                   help="how attention is computed: sdpa (fused) or manual (the explicit math), see attention.py")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each decoder block in the backward pass instead of storing its activations")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (DeepSpeed's engine.compile): faster steps after a compilation "
                        "at the start (about 20 s for the default model on 2 CPU cores)")


def _optimization_flags(p):
    """The optimizer, its schedule and how long it runs."""
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=None, help="packed rows per micro-batch per rank (default 16)")
    g.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--optimizer", default=None, choices=["muon", "adamw"],
                   help="muon: Muon on the blocks' weight matrices, AdamW on embeddings, head and norms "
                        "(DeepSpeed's); adamw: AdamW on everything. Default: muon for a new model, adamw with "
                        "--init-from (fine-tuning a trained model) or --zero-stage 3")
    g.add_argument("--lr", type=float, default=3e-3, help="AdamW's learning rate (with --optimizer muon: for the "
                   "embeddings, the head and the norms); the progress line and Train_lr show this one, "
                   "DeepSpeed's Train_Samples_lr the first group's (with Muon: --muon-lr's)")
    g.add_argument("--muon-lr", type=float, default=0.02, help="Muon's learning rate for the weight matrices")
    g.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay of the matrices: "
                   "each step shrinks them by lr x this, so under Muon (--muon-lr 0.02) ~7x more than under AdamW")
    g.add_argument("--warmup-steps", type=int, default=50)
    g.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm (default 1.0; 0: off)")
    g.add_argument("--steps", type=int, default=0, help="optimizer steps (0: use --epochs)")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the data when --steps is 0")


def _lora_flags(p):
    """LoRA (lora.py): adapters on the chosen projections; everything else frozen."""
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank instead of the "
                   "model (0: off); only the adapters are optimized, embeddings, norms and head stay frozen")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="the adapters' scale is alpha / rank")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    g.add_argument("--lora-targets", default="all", help="comma-separated projections as Llama names them "
                   "(q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj) or groups: all, attn, qkv, mlp, gate_up")
    g.add_argument("--lora-lr", type=float, default=None, help="the adapters' learning rate (default: --lr)")


def _preference_flags(p):
    """DPO's (--stage dpo, dpo.py)."""
    g = p.add_argument_group("DPO")
    g.add_argument("--beta", type=float, default=0.1, help="how far the policy may move from the reference "
                   "(the starting model): small beta, large moves")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO: the share of pairs assumed "
                   "to be labelled the wrong way round (0: plain DPO)")
    g.add_argument("--rpo-alpha", type=float, default=0.0, help="add the chosen reply's NLL per token, times this, "
                   "to the loss (RPO; TRL's rpo_alpha): keeps the chosen replies likely (0: plain DPO)")
    g.add_argument("--center-rewards", type=float, default=0.0, help="--stage reward: add this times (score of "
                   "chosen + score of rejected)^2 to each pair's loss (TRL's center_rewards_coefficient, e.g. 0.01): "
                   "scores centred at 0 on every prompt, what PPO's critic and --reward-clip assume")
    g.add_argument("--reference", default="precomputed", choices=("precomputed", "live"),
                   help="the reference's log-probabilities: computed once before training (no second model in "
                   "memory), or by a frozen copy of the starting model at every step (TRL's default; under "
                   "--zero-stage 3 sharded like the policy)")
    g.add_argument("--sft-data", default="", help="chat data (an SFT file) whose loss, times --sft-coef, joins "
                   "every step's (DPO, PPO, GRPO): each micro-batch comes with --batch-size of its conversations, so that "
                   "what SFT taught and the pairs do not cover is kept (InstructGPT's PPO-ptx, DeepSpeed-Chat's "
                   "unsupervised term)")
    g.add_argument("--sft-coef", type=float, default=1.0, help="the weight of --sft-data's loss (mean NLL per "
                   "supervised token)")


def _rl_flags(p):
    """PPO's and GRPO's (--stage ppo|grpo, ppo.py, rlhf.py)."""
    g = p.add_argument_group("PPO and GRPO")
    g.add_argument("--reward-model", default="", help="--stage ppo: the reward model (a --stage reward run); the "
                   "critic starts from it too")
    g.add_argument("--group", type=int, default=8, help="--stage grpo: replies per prompt")
    g.add_argument("--max-new-tokens", type=int, default=48, help="the longest reply a rollout samples")
    g.add_argument("--temperature", type=float, default=1.0, help="the rollouts' sampling temperature")
    g.add_argument("--ppo-epochs", type=int, default=1, help="passes over each rollout (each an optimizer step)")
    g.add_argument("--clip", type=float, default=0.2, help="the policy ratio's clip range, 1 +- this")
    g.add_argument("--clip-value", type=float, default=0.2, help="the critic's clip range around its old values")
    g.add_argument("--kl-coef", type=float, default=0.1, help="the price of a nat of drift from the reference: "
                   "per token in PPO's reward, GRPO's k3 estimate in its loss")
    g.add_argument("--reward-clip", type=float, default=5.0, help="the reward model's scores are clipped to +-this")
    g.add_argument("--reward-norm", default="answers", choices=["answers", "none"], help="--stage ppo: answers: "
                   "(score - mean) / std, the mean and std of the reward model's scores of the data's own answers, "
                   "before the clip (InstructGPT centres them); none: its raw scores (DeepSpeed-Chat)")
    g.add_argument("--gamma", type=float, default=1.0, help="GAE's discount")
    g.add_argument("--lam", type=float, default=0.95, help="GAE's lambda")
    g.add_argument("--whiten", action="store_true", help="--stage ppo: scale each rollout's advantages to mean 0, "
                   "std 1 (over all ranks' reply tokens)")
    g.add_argument("--critic-lr", type=float, default=None, help="the critic's learning rate (default: --lr)")
    g.add_argument("--ema", type=float, default=0.0, help="keep an exponential moving average of the policy's "
                   "weights with this beta (DeepSpeed-Chat uses 0.992), saved as RUN/ema/ (0: none; nanosft/ema.py)")


def _deepspeed_flags(p):
    """DeepSpeed's config: these win over --ds-config's, which win over CONFIG_DEFAULTS."""
    g = p.add_argument_group("deepspeed")
    g.add_argument("--ds-config", default=os.path.join(HERE, "configs/ds_config.json"),
                   help="DeepSpeed JSON to start from; the flags below win over it")
    g.add_argument("--zero-stage", type=int, default=None, choices=[0, 1, 2, 3], help="ZeRO stage (default 0)")
    g.add_argument("--offload", default=None, choices=["none", "optimizer", "all"],
                   help="ZeRO-Offload: optimizer state (stage >= 1) and, with 'all', parameters (stage 3) in CPU memory")
    g.add_argument("--dtype", default=None, choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 where supported, else fp16 on GPU (dynamic loss scaling) or fp32 on CPU")
    g.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")


def _run_flags(p):
    """Where the run goes, checkpoints, evaluation and logging."""
    g = p.add_argument_group("run")
    g.add_argument("--out", default="", help="run directory (default runs/<timestamp>)")
    g.add_argument("--save-every", type=int, default=0, help="write a DeepSpeed checkpoint every N steps (0: never)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="how many of the latest checkpoints to keep")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--threads", type=int, default=0, help="CPU threads (0: measured at start-up, for training and "
                   "for decoding apart; nanosft/machine.py)")
    g.add_argument("--eval-every", type=int, default=200, help="validation loss every N steps (0: only at "
                   "epoch ends); generation metrics run at step 0 and at the end, and at each epoch's end when "
                   "an epoch lasts N steps or more")
    g.add_argument("--log-every", type=int, default=25, help="with --quiet or no terminal: a line every N steps")
    g.add_argument("--quiet", action="store_true", help="no live progress bar: a plain line every --log-every steps")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard logs to <out>/tensorboard (DeepSpeed's monitor; pip install tensorboard)")


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.resume:
        args = resumed_args(args, given_flags(argv))
    if not os.path.isfile(args.ds_config):
        p.error(f"--ds-config {args.ds_config}: no such file")
    try:
        ds_base = read_json(args.ds_config)
    except ValueError as e:
        p.error(str(e))
    if not isinstance(ds_base, dict):
        p.error(f"{args.ds_config}: expected a JSON object (a DeepSpeed config), got {type(ds_base).__name__}")
    from_config = config_settings(ds_base)
    for k, default in CONFIG_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, from_config[k] if from_config[k] is not None else default)
    args.ds_base = ds_base
    for k, default in (("val_data", "data/val.jsonl"), ("eval_data", "data/eval.jsonl")):
        if getattr(args, k) is None:  # the built-in chat data's: for SFT, not for plain text or pairs
            setattr(args, k, os.path.join(HERE, default) if args.stage == "sft" else "")
    # Muon's steps are sized for training from scratch, not for nudging a base model; and a ZeRO-3
    # run with Muon once ended in an abort at exit ("terminate called without an active exception")
    if args.optimizer is None:
        args.optimizer = "adamw" if args.init_from or args.zero_stage == 3 or args.lora_rank else "muon"
    check_args(p, args)
    return args


def given_flags(argv=None):
    """Names of the flags given on the command line (not left at their defaults)."""
    p, unset = build_parser(), object()  # not a string: argparse would run a string default through `type`
    p.set_defaults(**{a.dest: unset for a in p._actions})
    return {k for k, v in vars(p.parse_args(argv)).items() if v is not unset}


def resumed_args(args, given):
    """A resumed run takes its settings from the run's args.json; flags given again must agree."""
    if not args.out:
        raise SystemExit("error: --resume needs the --out of the run to continue")
    path = os.path.join(args.out, "args.json")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} not found: {args.out} is not a run started by train.py")
    try:
        recorded = read_json(path)
    except ValueError:  # invalid JSON or UTF-8
        recorded = None
    if not isinstance(recorded, dict):
        raise SystemExit(f"error: {path} is not the JSON object train.py writes; the run cannot be resumed from it")
    # a setting it lacks takes its default, except the optimizer: runs from before Muon used AdamW
    saved = {**vars(build_parser().parse_args([])), "optimizer": "adamw", **recorded}
    if isinstance(saved["data"], str):
        saved["data"] = [saved["data"]]  # one path, not a list

    def same(k):
        a, b = getattr(args, k), saved[k]
        if k == "data":
            return [os.path.abspath(x) for x in a] == [os.path.abspath(x) for x in b]
        return os.path.abspath(a) == os.path.abspath(b) if k in PATH_FLAGS and a and b else a == b
    changed = [k for k in given - RESUME_MAY_CHANGE if k in saved and not same(k)]
    if changed:
        raise SystemExit("error: --resume continues the run as it started; these flags differ from "
                         f"{path}: " + ", ".join(f"--{k.replace('_', '-')} {saved[k]!r} (given {getattr(args, k)!r})"
                                                  for k in sorted(changed)))
    for k in given & RESUME_MAY_CHANGE:
        saved[k] = getattr(args, k)
    saved["resume"] = True
    return argparse.Namespace(**saved)


def model_config(args, vocab_size):
    """The ModelConfig the model flags describe (an --attn variant's fields win over them)."""
    fields = dict(vocab_size=vocab_size, dim=args.dim, n_layer=args.n_layer, n_head=args.n_head,
                  n_kv_head=args.n_kv_head, max_seq_len=args.max_seq_len, attn_impl=args.attn_impl)
    return ModelConfig(**{**fields, **VARIANTS.get(args.attn, {})})


def in_flag_terms(message, args):
    """ModelConfig's message with each field named by the flag that set it (--attn NAME for a
    field the variant sets)."""
    variant = VARIANTS.get(args.attn, {})
    return re.sub(r"\b(" + "|".join(FIELD_FLAGS) + r")\b",
                  lambda m: f"--attn {args.attn}" if m[1] in variant else FIELD_FLAGS[m[1]], message)


def check_args(p, args):
    """Refuse what cannot run, naming the flag: p.error prints the usage and the reason, exit 2."""
    if min(args.batch_size, args.grad_accum, args.max_seq_len) < 1 or args.steps < 0:
        p.error("--batch-size, --grad-accum and --max-seq-len must be at least 1, --steps not negative")
    if args.warmup_steps < 0 or args.seed < 0 or not 0 <= (args.grad_clip or 0) < math.inf:
        p.error("--warmup-steps, --seed and --grad-clip must not be negative (nor nan or inf)")
    if not (0 < args.lr < math.inf and 0 < args.muon_lr < math.inf):
        p.error("--lr and --muon-lr must be positive numbers")
    if not args.steps and not 0 < args.epochs < float("inf"):
        p.error("--epochs must be a positive number (or give --steps)")
    try:
        weighted = [d for d in args.data if parse_source(d)[0] != d]  # (FILE:W)
    except ValueError as e:
        p.error(str(e))
    if args.format != "auto" and (args.format in PAIR_FORMATS) != (args.stage in PAIR_STAGES):
        p.error(f"--format {args.format} is a format of {'preference pairs' if args.format in PAIR_FORMATS else 'chats'}"
                f", --stage {args.stage} reads {'pairs' if args.stage in PAIR_STAGES else 'chats or text'}")
    if args.stage in PAIR_STAGES + RL_STAGES and not args.init_from:
        p.error(f"--stage {args.stage} starts from a trained model: give it with --init-from (e.g. an SFT run)")
    if args.stage in PAIR_STAGES:
        if weighted:
            p.error(f"--stage {args.stage}: several --data files are read one after another; weights (FILE:W) "
                    "are for blending SFT data")
        if args.stage == "reward" and args.eval_data:
            p.error("--eval-data: a reward model scores replies, it does not write them (its held-out pairs are "
                    "--val-data's)")
        if not (0 < args.beta < math.inf and 0 <= args.label_smoothing < 0.5 and 0 <= args.rpo_alpha < math.inf
                and 0 <= args.center_rewards < math.inf):
            p.error("--beta must be positive, --label-smoothing in [0, 0.5), --rpo-alpha and --center-rewards not negative")
    if args.stage in RL_STAGES:
        if args.stage == "ppo" and not args.reward_model:
            p.error("--stage ppo needs --reward-model (a --stage reward run)")
        if args.val_data or args.val_split:
            p.error(f"--stage {args.stage} has no validation loss: --eval-data's held-out prompts measure it")
        if min(args.group, args.max_new_tokens, args.ppo_epochs) < 1 or args.temperature <= 0:
            p.error("--group, --max-new-tokens and --ppo-epochs must be positive, and --temperature above 0")
    if args.whiten and args.stage != "ppo":
        p.error("--whiten is PPO's (--stage ppo; GRPO's advantages are scaled per group)")
    if not 0 <= args.ema < 1 or (args.ema and args.stage not in RL_STAGES):
        p.error("--ema is the RL stages' (--stage ppo|grpo), a beta in [0, 1)")
    if args.reference == "live" and args.stage != "dpo":
        p.error("--reference is DPO's (--stage dpo)")
    if args.sft_data and args.stage not in ("dpo",) + RL_STAGES:
        p.error("--sft-data mixes the SFT loss into --stage dpo's, ppo's or grpo's")
    if not 0 <= args.sft_coef < math.inf:
        p.error("--sft-coef must not be negative")
    if args.attn and args.init_from:
        p.error("--attn builds a new model; a model from --init-from keeps the attention it was trained with")
    if not args.init_from:
        try:
            if not args.tokenizer and args.tokenizer_kind == "bytelevel":  # one is trained: refused now,
                ByteLevelBPE.check_vocab_size(args.vocab_size, Tokenizer.CHAT_TOKENS)  # not after reading the data
            elif not args.tokenizer:
                Tokenizer.check_vocab_size(args.vocab_size)
            model_config(args, args.vocab_size)
        except ValueError as e:
            p.error(in_flag_terms(str(e), args))
    if args.lora_rank:
        if args.lora_rank < 0 or not 0 <= args.lora_dropout < 1 or not 0 < args.lora_alpha < math.inf:
            p.error("--lora-rank must be at least 1 (0: off), --lora-alpha positive, --lora-dropout in [0, 1)")
        if args.optimizer == "muon":
            p.error("--optimizer muon with --lora-rank: LoRA trains with AdamW (Muon orthogonalizes whole weight "
                    "matrices, not their low-rank factors)")
        try:
            expand_targets(args.lora_targets.split(","))
        except ValueError as e:
            p.error(f"--lora-targets: {e}")
    elif args.lora_rank < 0:
        p.error("--lora-rank must not be negative (0: off)")
    if args.offload == "optimizer" and args.zero_stage == 0:
        p.error("--offload optimizer needs --zero-stage 1, 2 or 3 (ZeRO-Offload moves the partitioned optimizer)")
    if args.offload == "all" and args.zero_stage != 3:
        p.error("--offload all needs --zero-stage 3 (only stage 3 partitions the parameters)")
    if args.dtype == "fp16" and not torch.cuda.is_available():
        p.error("--dtype fp16 needs a GPU (DeepSpeed has no fp16 training on CPU); use bf16 or fp32")
    if not 0 <= args.val_split < 1:
        p.error("--val-split must be in [0, 1)")
    if args.save_every < 0 or args.keep_checkpoints < 1:
        p.error("--save-every must not be negative and --keep-checkpoints at least 1")
    if args.threads < 0:
        p.error("--threads must not be negative (0: measured)")
    if args.eval_every < 0 or args.log_every < 1:
        p.error("--eval-every must not be negative and --log-every at least 1")
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:  # DeepSpeed's monitor writes through it
        p.error("--tensorboard needs the tensorboard package: pip install tensorboard")
