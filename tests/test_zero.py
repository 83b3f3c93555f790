"""What DeepSpeed gives a run, proven on CPU ranks (gloo) under the deepspeed launcher:

- every ZeRO stage (1, 2, 3, and 2 with the optimizer offloaded to CPU) trains exactly like one
  rank without ZeRO, given the same global batch: same losses, step for step;
- the gradient of a step does not depend on how its global batch is cut into micro-batches;
- a run killed with SIGKILL and resumed with --resume continues with exactly the losses of a run
  that was never interrupted, and `latest` never names a half-written checkpoint;
- ZeRO-3's sharded weights are gathered into one file that chat.py answers from like the
  stage-0 run's;
- the memory report measures what ZeRO saves: stage 3 holds about half of stage 0's model states
  per rank on 2 ranks.

These start real training processes, so they are marked slow (still part of `make test`)."""

import json
import os
import random
import signal
import subprocess
import sys

import deepspeed
import pytest
import torch
import torch.nn.functional as F
from conftest import DIST_VARS, ROOT, TINY, kill_at, run, run_chat, run_train

from nanosft.checkpoint import load_model
from nanosft.data import epoch_rows, load_jsonl, render_conversations, to_batch
from nanosft.distributed import deepspeed_config, make_optimizer, save_checkpoint, setup_distributed
from nanosft.model import ModelConfig, Transformer
from nanosft.monitor import read_monitor
from nanosft.template import ChatTemplate
from nanosft.tokenizer import Tokenizer

from train import train_step

pytestmark = pytest.mark.slow

ZERO_TINY = list(TINY)  # the tiny model; batch flags are set per run below
for flag in ("--batch-size", "--grad-accum"):
    i = ZERO_TINY.index(flag)
    del ZERO_TINY[i:i + 2]


def launch(nproc, data_dir, out, *flags, steps=20):
    """train.py on `nproc` CPU ranks under the deepspeed launcher (1: plain python)."""
    common = ["--data", str(data_dir / "train.jsonl"), "--val-data", "", "--eval-data", "", "--out", str(out),
              "--steps", str(steps), *ZERO_TINY, *flags]
    if nproc == 1:
        r = run_train(*common)
    else:
        launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
        port = str(29600 + abs(hash(str(out))) % 300)
        r = run([launcher, "--num_gpus", str(nproc), "--master_port", port, os.path.join(ROOT, "train.py"), *common])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def losses(out):
    return list(read_monitor(out)["Train_loss"].values())


# The same global batch of 8 rows everywhere: 1 rank x 4 rows x 2 micro-batches, or 2 ranks x 2 x 2
# (or 1 x 4 for stage 3). Ranks take every other row of the packed epoch, so the 8 rows are the same.
RUNS = {
    "stage1": (2, "--zero-stage", "1", "--batch-size", "2", "--grad-accum", "2"),
    "stage2": (2, "--zero-stage", "2", "--batch-size", "2", "--grad-accum", "2"),
    # the hardest combination: sharded weights gathered again when checkpointed blocks recompute
    "stage3": (2, "--zero-stage", "3", "--batch-size", "1", "--grad-accum", "4", "--gradient-checkpointing"),
    "stage2_offload": (2, "--zero-stage", "2", "--offload", "optimizer", "--batch-size", "2", "--grad-accum", "2"),
}


@pytest.fixture(scope="module")
def stage0(tiny_data):
    return launch(1, tiny_data, tiny_data / "zero" / "stage0", "--dtype", "fp32", "--batch-size", "4", "--grad-accum", "2")


@pytest.fixture(scope="module")
def zero_runs(tiny_data):
    return {name: launch(n, tiny_data, tiny_data / "zero" / name, "--dtype", "fp32", *flags)
            for name, (n, *flags) in RUNS.items()}


LORA = ("--lora-rank", "4", "--lora-targets", "qkv,o_proj,down_proj", "--lora-lr", "2e-2")


@pytest.mark.parametrize("stage", ["1", "2", "3"])
def test_lora_under_zero_on_two_ranks_trains_like_stage0_on_one(tiny_data, stage0, stage):
    """The frozen model sharded, gathered and never updated; the adapters' gradients and moments
    sharded; with gradient checkpointing on stage 3 (frozen blocks recomputed around live adapters)."""
    lora0 = tiny_data / "zero" / "lora0"
    if not (lora0 / "metrics.json").exists():  # one stage-0 reference for the three
        launch(1, tiny_data, lora0, "--dtype", "fp32", "--batch-size", "4", "--grad-accum", "2", *LORA, steps=10)
    extra = ("--gradient-checkpointing",) if stage == "3" else ()
    got = launch(2, tiny_data, tiny_data / "zero" / f"lora{stage}", "--dtype", "fp32", "--zero-stage", stage,
                 "--batch-size", "2", "--grad-accum", "2", *LORA, *extra, steps=10)
    ref, got_losses = losses(lora0), losses(got)
    assert len(ref) == len(got_losses) == 10 and ref[-1] < ref[0] - 0.1  # training
    for step, (a, b) in enumerate(zip(ref, got_losses), 1):
        assert abs(a - b) <= 1e-4 * abs(a), f"step {step}: stage 0 loss {a}, stage {stage} loss {b}"
    base = load_model(stage0)[0].state_dict()  # (the same initial model: the same seed)
    merged = load_model(got)[0].state_dict()
    assert (got / "adapter_model.safetensors").exists()
    assert torch.equal(merged["embed_tokens.weight"], load_model(lora0)[0].state_dict()["embed_tokens.weight"])
    assert not torch.equal(merged["layers.0.self_attn.qkv_proj.weight"], base["layers.0.self_attn.qkv_proj.weight"])


@pytest.mark.parametrize("name", list(RUNS))
def test_zero_stage_on_two_ranks_trains_like_stage0_on_one(name, stage0, zero_runs):
    ref, got = losses(stage0), losses(zero_runs[name])
    assert len(ref) == len(got) == 20
    for step, (a, b) in enumerate(zip(ref, got), 1):
        assert abs(a - b) <= 1e-4 * abs(a), f"step {step}: stage 0 loss {a}, {name} loss {b}"
    assert ref[-1] < ref[0] - 1.0  # and it is training, not standing still
    cfg = json.loads((zero_runs[name] / "ds_config.json").read_text())
    assert cfg["train_batch_size"] == 8 and cfg["zero_optimization"]["stage"] == int(RUNS[name][2])
    if name == "stage2_offload":
        assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        # DeepSpeed's CPU Adam, compiled on first use inside the virtual environment
        # (nanosft/distributed.py), not in a folder that every checkout of the user shares
        ops = os.path.join(sys.prefix, "torch_extensions")
        if sys.prefix != sys.base_prefix and os.environ.get("TORCH_EXTENSIONS_DIR", ops) == ops:
            assert os.path.isdir(os.path.join(ops, "cpu_adam"))


def test_zero3_gathered_weights_load_in_chat_and_answer_like_stage0(stage0, zero_runs, tiny_data, tmp_path):
    ref, got = load_model(stage0)[0].state_dict(), load_model(zero_runs["stage3"])[0].state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)
    prompts = tmp_path / "prompts.jsonl"
    first_turns = [r["messages"][:[m["role"] for m in r["messages"]].index("user") + 1]  # (system and) user
                   for r in load_jsonl(tiny_data / "val.jsonl")[:12]]
    prompts.write_text("".join(json.dumps({"messages": m}) + "\n" for m in first_turns))
    replies = []
    for run_dir in (stage0, zero_runs["stage3"]):
        r = run_chat("--ckpt", str(run_dir), "--batch", str(prompts), "--max-new-tokens", "8")
        assert r.returncode == 0, r.stderr[-2000:]
        replies.append(r.stdout.splitlines())
    assert len(replies[0]) == 12 and replies[0] == replies[1]


def test_stage3_holds_at_most_055_of_stage0_model_states_per_rank(tiny_data):
    """Measured in bf16 (mixed precision, the usual way to run ZeRO): stage 0 keeps per weight 2
    bytes of bf16 weight, 2 of gradient, 4 of fp32 master copy and 8 of Adam moments on every
    rank; stage 3 on 2 ranks keeps half of each."""
    reports = {}
    for stage in (0, 3):
        out = launch(2, tiny_data, tiny_data / "zero" / f"memory{stage}", "--dtype", "bf16", "--zero-stage", str(stage),
                     "--batch-size", "2", "--grad-accum", "1", steps=2)
        reports[stage] = json.loads((out / "memory.json").read_text())
        # the saved weights are the fp32 master weights, not the bf16 copies the module computes with
        w = load_model(out)[0].state_dict()["layers.0.mlp.gate_up_proj.weight"]
        assert (w.bfloat16().float() != w).float().mean() > 0.9
    n = reports[0]["params"]
    per_rank = {s: [r["cpu"] for r in rep["per_rank"]] for s, rep in reports.items()}
    for r in per_rank[0]:  # stage 0: a full replica on each rank, byte for byte
        assert r["parameters"] == 2 * n and r["master_weights"] == 4 * n and r["gradients"] == 2 * n
        assert 8 * n <= r["optimizer_state"] <= 8 * n + 64 * 40  # + Adam's step counters
    for r in per_rank[3]:
        assert r["parameters"] <= 1.01 * n  # half of the bf16 weights (shards are padded a little)
        ratio = r["model_states"] / per_rank[0][0]["model_states"]
        assert ratio <= 0.55, f"stage 3 holds {ratio:.3f} of stage 0's model states"
    assert reports[3]["estimate_per_rank"]["model_states"] == 8 * n  # (2 + 2 + 4 + 8) / 2 bytes per weight


# -----------------------------------------------------------------------------
# in-process: one CPU rank over gloo

@pytest.fixture(scope="module")
def one_rank():
    setup_distributed()
    yield
    torch.distributed.destroy_process_group()
    for k in DIST_VARS:
        os.environ.pop(k, None)


def micro_batches(tiny_data, split):
    """8 packed rows cut into `split` micro-batches; the rows are ordered so that the
    micro-batches hold very different numbers of supervised tokens."""
    records = load_jsonl(tiny_data / "train.jsonl")
    tok = Tokenizer.train([m["content"] for r in records for m in r["messages"]], 300)
    samples, _ = render_conversations(records, ChatTemplate(tok), 129)
    rows = epoch_rows(samples, 129, tok.pad_id, 7, 0)
    by_supervision = sorted(range(len(rows["ids"])), key=lambda i: rows["mask"][i].sum())
    chosen = by_supervision[:4] + by_supervision[-4:]
    rows = {k: v[chosen] for k, v in rows.items()}
    size = 8 // split
    return [to_batch(rows, slice(i, i + size)) for i in range(0, 8, size)], tok.vocab_size


def step_gradient(micro, vocab):
    """train.py's train_step through a DeepSpeed engine; the gradient it hands the optimizer."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=vocab, dim=32, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=128))
    cfg = deepspeed_config({"zero_allow_untested_optimizer": True}, world=1, micro_batch=len(micro[0]["idx"]),
                           grad_accum=len(micro), zero_stage=0, offload="none", dtype="fp32", grad_clip=0.0,
                           pin_memory=False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(model, 1e-3, 0.0, "none"), config=cfg)
    grads = {}
    train_step(engine, micro, 1, torch.device("cpu"),
               before_step=lambda: grads.update({n: p.grad.clone() for n, p in engine.module.named_parameters()}))
    return grads


def test_gradient_does_not_depend_on_how_the_global_batch_is_split(tiny_data, one_rank):
    whole, vocab = micro_batches(tiny_data, 1)
    # the reference, plain autograd on the whole batch: summed token losses / supervised tokens
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=vocab, dim=32, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=128))
    b = whole[0]
    logits = model(b["idx"], pos=b["pos"], doc=b["doc"])
    nll = F.cross_entropy(logits.flatten(0, 1), b["targets"].flatten(), reduction="none")
    (nll * b["loss_mask"].flatten()).sum().div(b["loss_mask"].sum()).backward()
    reference = {n: p.grad for n, p in model.named_parameters()}
    for split in (1, 2, 4):  # 1 x 8, 2 x 4, 4 x 2 rows
        micro, _ = micro_batches(tiny_data, split)
        counts = [int(m["loss_mask"].sum()) for m in micro]
        assert split == 1 or max(counts) > 2 * min(counts)  # unequal supervised tokens per micro-batch
        grads = step_gradient(micro, vocab)
        for n, g in reference.items():
            torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-7, msg=f"{split} micro-batches: {n}")


class FailingEngine:
    """Dies half-way through writing a checkpoint, as a killed process would."""
    def save_checkpoint(self, save_dir, tag, **kw):
        os.makedirs(os.path.join(save_dir, tag))
        open(os.path.join(save_dir, tag, "half_written.pt"), "w").close()
        raise KeyboardInterrupt


class WritingEngine:
    def save_checkpoint(self, save_dir, tag, **kw):
        os.makedirs(os.path.join(save_dir, tag))


def test_latest_names_a_checkpoint_only_once_it_is_complete(tmp_path, one_rank):
    for step in (10, 20, 30):
        save_checkpoint(WritingEngine(), str(tmp_path), step, {}, keep=2)
    assert (tmp_path / "latest").read_text() == "step00000030"
    assert sorted(os.listdir(tmp_path)) == ["latest", "step00000020", "step00000030"]  # keep=2
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(FailingEngine(), str(tmp_path), 40, {})
    assert (tmp_path / "latest").read_text() == "step00000030"  # not the half-written step 40
    assert not list(tmp_path.glob("*.tmp"))  # nor a temporary file beside it


# -----------------------------------------------------------------------------
# resume

def train_command(nproc, *flags):
    if nproc == 1:
        return [sys.executable, os.path.join(ROOT, "train.py"), *flags]
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return [launcher, "--num_gpus", str(nproc), "--master_port", str(29900 + len(flags)), os.path.join(ROOT, "train.py"), *flags]


@pytest.mark.parametrize("nproc, zero, optimizer", [(1, "0", "muon"), (2, "3", "adamw"), (1, "0", "lora")])
def test_run_killed_with_sigkill_resumes_with_the_same_losses(tiny_data, tmp_path, nproc, zero, optimizer):
    """Each optimizer's state is in the checkpoint: Muon's momentum, AdamW's moments (sharded
    under ZeRO-3), LoRA's adapters and their moments beside the frozen model."""
    # 8 rows a step: the first epoch (~200 rows) ends near step 25, so the resumed position (a
    # checkpoint every 8 steps) lies in the second epoch, after the rows carried over
    batch = ["--batch-size", "4", "--grad-accum", "2"] if nproc == 1 else ["--batch-size", "2", "--grad-accum", "2"]
    flags = ["--data", str(tiny_data / "train.jsonl"), "--val-data", str(tiny_data / "val.jsonl"), "--eval-data", "",
             "--steps", "50", "--dtype", "fp32", "--zero-stage", zero, "--save-every", "8", "--log-every", "1",
             "--tensorboard", *ZERO_TINY, *batch,
             *(["--lora-rank", "4", "--lora-lr", "1e-2"] if optimizer == "lora" else ["--optimizer", optimizer])]
    whole = tmp_path / "whole"
    r = run(train_command(nproc, *flags, "--out", str(whole)))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    killed = tmp_path / "killed"
    assert kill_at(train_command(nproc, *flags, "--out", str(killed)), 35) == -signal.SIGKILL
    assert not (killed / "metrics.json").exists()
    tag = (killed / "checkpoints" / "latest").read_text()
    assert tag >= "step00000032"

    r = run(train_command(nproc, "--out", str(killed), "--resume"))  # the settings come from the run's args.json
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"resumed {killed} at step {int(tag[4:])} (epoch 1)" in r.stdout
    for name in ("Train_loss", "Train_lr", "Train_tokens", "Train_Samples_lr", "Eval_val_loss"):
        want, got = ((d / "monitor" / f"{name}.csv").read_text() for d in (whole, killed))
        assert got == want, name  # every step once (one header), each loss to the last printed digit
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    want, got = (EventAccumulator(str(d / "tensorboard")).Reload() for d in (whole, killed))
    assert sorted(got.Tags()["scalars"]) == sorted(want.Tags()["scalars"])
    for name in want.Tags()["scalars"]:  # TensorBoard's events too: every step once, the same values
        timing = name in ("Train/tokens_per_s", "Train/elapsed_s")  # (clock readings differ)
        assert ([(e.step, None if timing else e.value) for e in got.Scalars(name)] ==
                [(e.step, None if timing else e.value) for e in want.Scalars(name)]), name
    a, b = load_model(whole)[0].state_dict(), load_model(killed)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    m = json.loads((killed / "metrics.json").read_text())
    assert m["val_loss_before"] == json.loads((whole / "metrics.json").read_text())["val_loss_before"]


@pytest.mark.parametrize("nproc, sig", [(1, signal.SIGINT), (1, signal.SIGTERM), (2, signal.SIGINT)])
def test_ctrl_c_or_sigterm_finishes_the_step_saves_and_resumes_exactly(tiny_data, tmp_path, nproc, sig):
    """The signal reaches every process of the run (a terminal's Ctrl-C, a scheduler's SIGTERM) at
    a random step: a checkpoint and the model so far are saved, the run says how to resume, exits
    non-zero without a traceback of its own, and --resume gives the uninterrupted run's losses
    and weights."""
    batch = ["--batch-size", "4", "--grad-accum", "2"] if nproc == 1 else ["--batch-size", "2", "--grad-accum", "2"]
    flags = ["--data", str(tiny_data / "train.jsonl"), "--val-data", str(tiny_data / "val.jsonl"), "--eval-data", "",
             "--steps", "40", "--dtype", "fp32", "--log-every", "1", *ZERO_TINY, *batch]
    whole = tiny_data / "uninterrupted" / str(nproc)  # (shared by the tests with as many ranks)
    if not (whole / "metrics.json").exists():
        r = run(train_command(nproc, *flags, "--out", str(whole)))
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    at = random.Random(f"{nproc}:{sig}").randint(3, 35)
    stopped, err = tmp_path / "stopped", tmp_path / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    with open(err, "w") as stderr:
        p = subprocess.Popen(train_command(nproc, *flags, "--out", str(stopped)), cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True)
        out = []
        for line in p.stdout:  # to the end: under the launcher the ranks outlive the runner
            out.append(line)
            if line.startswith(f"step {at}/"):
                os.killpg(p.pid, sig)
        p.wait()
    text = err.read_text()
    assert p.returncode != 0 and f"--out {stopped} --resume" in text, "".join(out)[-2000:] + text[-2000:]
    if nproc == 1:  # (under the launcher, DeepSpeed's own runner reports the interrupt in its way)
        assert p.returncode == 128 + sig and "Traceback" not in text
    tag = (stopped / "checkpoints" / "latest").read_text()
    assert int(tag[4:]) in (at, at + 1) and (stopped / "model.safetensors").exists()
    assert not (stopped / "metrics.json").exists()

    r = run(train_command(nproc, "--out", str(stopped), "--resume"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    want, got = ((d / "monitor" / "Train_loss.csv").read_text() for d in (whole, stopped))
    assert got == want
    a, b = load_model(whole)[0].state_dict(), load_model(stopped)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_changed_settings(tiny_run):
    _, out = tiny_run
    r = run_train("--out", str(out), "--resume", "--lr", "0.5")
    assert r.returncode != 0 and "--lr 0.01 (given 0.5)" in r.stderr and "Traceback" not in r.stderr
    r = run_train("--out", str(out), "--resume")
    assert r.returncode != 0 and "nothing to resume" in r.stderr and "Traceback" not in r.stderr
