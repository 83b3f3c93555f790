"""train.py promises: wrapping the model in deepspeed.initialize changes nothing about the maths (a
single-rank fp32 run, and a 2-rank ZeRO-2 run under the deepspeed launcher, equal a plain PyTorch
loop step for step, with the loss normalised by the supervised tokens of the whole global batch;
--compile changes nothing either),
a run directory holds what chat.py and users rely on, and bad input stops the run with a clear
message: file, line and reason for data, the flag for flags.

These start real training processes, so they are marked slow (still part of `make test`)."""

import argparse
import json
import math
import os
import sys

import pytest
import torch
from conftest import ROOT, TINY, run, run_chat, run_train, tiny_start

from nanosft.checkpoint import load_model
from nanosft.data import load_jsonl, render_conversations, to_batch
from nanosft.loss import masked_nll
from nanosft.model import ModelConfig, Transformer
from nanosft.monitor import read_monitor
from nanosft.template import ChatTemplate
from nanosft.tokenizer import Tokenizer


def reference_weights(data_dir, steps=5, seed=7, batch=2, accum=2, lr=1e-2, warmup=2, world=1):
    """The same training written as a plain PyTorch loop, no DeepSpeed: each step takes the rows
    every rank would take, and divides the summed loss by the supervised tokens of them all."""
    model, shards = tiny_start(data_dir, seed, world)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.0},
                             {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else
                                              0.1 + 0.45 * (1 + math.cos(math.pi * min((s - warmup) / (steps - warmup), 1))))
    cursor = 0
    for _ in range(steps):
        micro = [to_batch(rows, slice(cursor + i * batch, cursor + (i + 1) * batch))
                 for rows in shards for i in range(accum)]
        cursor += accum * batch
        # the loss of the whole step: every supervised token of all micro-batches weighs the same
        total = sum(masked_nll(model(b["idx"], pos=b["pos"], doc=b["doc"]), b["targets"], b["loss_mask"])[0] for b in micro)
        loss = total / sum(b["loss_mask"].sum() for b in micro)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return model.state_dict()


def test_single_rank_deepspeed_run_equals_plain_pytorch_loop(tiny_run):
    data_dir, out = tiny_run
    ours = load_model(out)[0].state_dict()
    ref = reference_weights(data_dir)
    assert ours.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)
    # and training moved the weights at all
    torch.manual_seed(7)
    assert not torch.allclose(ours["layers.0.mlp.gate_up_proj.weight"], Transformer(ModelConfig(vocab_size=300, dim=32, n_layer=2, n_head=4, n_kv_head=2)).state_dict()["layers.0.mlp.gate_up_proj.weight"])


def test_run_directory_has_weights_tokenizer_config_metrics_log_and_plot(tiny_run):
    _, out = tiny_run
    for f in ("model.safetensors", "config.json", "tokenizer.model", "ds_config.json", "metrics.json", "args.json",
              "memory.json", "loss.png"):
        assert (out / f).exists(), f
    m = json.loads((out / "metrics.json").read_text())
    for k in ("val_loss", "val_ppl", "exact_match", "bleu", "before", "after", "samples", "train_tokens_per_s",
              "wall_time_s"):
        assert k in m, k
    assert math.isclose(m["val_ppl"], math.exp(m["val_loss"]), rel_tol=1e-9)
    families = {"recall", "recall_zh", "copy", "max", "count", "persona"}
    assert set(m["exact_match"]) == families | {"overall"} and m["exact_match"] == m["after"]["exact_match"]
    assert m["before"]["val_loss"] == m["val_loss_before"] > m["val_loss"]  # step 0 vs trained, in one place
    assert {s["family"] for s in m["samples"]} == families and {"step 0", "trained", "answer"} <= set(m["samples"][0])
    assert os.path.realpath(out.parent / "latest") == str(out)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_deepspeed_monitor_csv_has_one_row_per_step_and_the_evaluations(tiny_run):
    _, out = tiny_run
    log = read_monitor(out)  # runs/<name>/monitor/*.csv, written by DeepSpeed's csv_monitor
    for name in ("loss", "lr", "tokens", "supervised_tokens", "tokens_per_s", "elapsed_s", "skipped_steps"):
        assert list(log[f"Train_{name}"]) == [1, 2, 3, 4, 5], name
    tokens = list(log["Train_tokens"].values())
    assert all(b > a for a, b in zip(tokens, tokens[1:]))  # cumulative
    assert set(log["Train_skipped_steps"].values()) == {0} and "Train_loss_scale" not in log  # no fp16
    assert list(log["Train_Samples_lr"]) == [4, 8, 12, 16, 20]  # DeepSpeed's own event, counted in samples
    m = json.loads((out / "metrics.json").read_text())
    assert log["Eval_val_loss"] == {0: m["val_loss_before"], 5: m["val_loss"]}
    assert log["Eval_exact_match"][5] == m["exact_match"]["overall"] and log["Eval_bleu"][5] == m["bleu"]
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 4 and ds["gradient_accumulation_steps"] == 2


@pytest.mark.slow  # (two processes under the launcher)
def test_two_rank_zero2_run_under_the_launcher_equals_plain_pytorch_loop(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ops"))  # where DeepSpeed would build ops
    out = tmp_path / "run2"
    shm = set(os.listdir("/dev/shm"))
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    r = run([launcher, "--num_gpus", "2", "--master_port", "29731", os.path.join(ROOT, "train.py"),
             "--data", str(tiny_data / "train.jsonl"), "--val-data", "", "--eval-data", "", "--out", str(out),
             "--steps", "5", "--dtype", "fp32", "--zero-stage", "2", *TINY])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 rank(s)" in r.stdout
    # DeepSpeed's CPU backend would first compile a shared-memory all-reduce that training never calls
    assert not (tmp_path / "ops").exists() and "built successfully" not in r.stdout
    # nor map its buffers into /dev/shm (66 MB a rank, left behind after every run)
    assert not [f for f in set(os.listdir("/dev/shm")) - shm if f.startswith("deepspeed")]
    ours = load_model(out)[0].state_dict()
    ref = reference_weights(tiny_data, world=2)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow  # (compiling the step: tens of seconds)
def test_compiled_run_equals_the_eager_run(tiny_run, tmp_path):
    data_dir, eager = tiny_run
    out = tmp_path / "compiled"
    r = run_train("--data", str(data_dir / "train.jsonl"), "--val-data", str(data_dir / "val.jsonl"),
                  "--eval-data", str(data_dir / "eval.jsonl"), "--out", str(out), "--steps", "5",
                  "--dtype", "fp32", "--compile", *TINY)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = read_monitor(eager), read_monitor(out)
    assert list(b["Train_loss"]) == [1, 2, 3, 4, 5]
    for step, loss in a["Train_loss"].items():
        assert math.isclose(b["Train_loss"][step], loss, rel_tol=1e-4), (step, loss, b["Train_loss"][step])
    # compiled kernels add in another order; Adam's early steps are about lr * sign(grad), so a
    # gradient within rounding of 0 may move its weight by a fraction of lr (1e-2): atol lr / 100
    ours, ref = load_model(out)[0].state_dict(), load_model(eager)[0].state_dict()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-4, atol=1e-4, msg=lambda m: f"{k}: {m}")
    m_eager, m = (json.loads((d / "metrics.json").read_text()) for d in (eager, out))  # and so does evaluation
    assert math.isclose(m["val_loss"], m_eager["val_loss"], rel_tol=1e-4)


def test_malformed_jsonl_stops_with_file_line_and_reason(tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    bad.write_text(good + "\n" + good + "\n" + '{"messages": [{"role": "user", "content": "hi"},' + "\n")
    r = run_train("--data", str(bad), "--out", str(tmp_path / "run"), "--steps", "1", *TINY)
    assert r.returncode != 0
    assert f"{bad}:3: invalid JSON" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("flags, complaint", [
    (["--dim", "30"], "--dim 30 must split into --n-head 4 heads"),
    (["--n-kv-head", "3"], "must be a multiple of the 3 key/value heads of --n-kv-head"),
    (["--n-head", "3", "--dim", "48", "--attn", "gqa"], "multiple of the 2 key/value heads of --attn gqa"),
    (["--attn", "alibi", "--init-from", "runs/x"], "--attn builds a new model"),
    (["--batch-size", "0"], "--batch-size"),
    (["--n-head", "0"], "--n-head and --dim must be at least 1"),
    (["--epochs", "0"], "--epochs must be a positive number"),
    (["--grad-clip", "-1"], "--grad-clip must not be negative"),
    (["--grad-clip", "nan"], "--grad-clip must not be negative"),
    (["--offload", "optimizer"], "--offload optimizer needs --zero-stage 1, 2 or 3"),
    (["--zero-stage", "2", "--offload", "all"], "--offload all needs --zero-stage 3"),
    (["--dtype", "fp16"], "--dtype fp16 needs a GPU"),
    (["--vocab-size", "3"], "--vocab-size must exceed 264"),  # at once, before any data is read
    (["--ema", "0.99"], "--ema is the RL stages'"),
    (["--stage", "grpo", "--init-from", "runs/x", "--whiten"], "--whiten is PPO's"),
    (["--stage", "grpo", "--init-from", "runs/x", "--ema", "1"], "--ema is the RL stages' (--stage ppo|grpo), a beta in [0, 1)"),
])
def test_impossible_flags_are_refused_by_name(flags, complaint):
    r = run_train(*TINY, *flags)
    assert r.returncode == 2 and complaint in r.stderr and "Traceback" not in r.stderr


def test_flags_win_over_the_ds_config_which_wins_over_the_defaults(tmp_path):
    from nanosft.train_args import parse_args
    from nanosft.distributed import config_settings, deepspeed_config
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3, "gradient_clipping": 0.5, "bf16": {"enabled": True},
                                "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"},
                                                      "reduce_bucket_size": 1000}}))
    args = parse_args(["--ds-config", str(mine), "--zero-stage", "3", "--grad-accum", "4"])
    assert (args.zero_stage, args.grad_accum) == (3, 4)  # the flags
    assert (args.batch_size, args.grad_clip, args.dtype, args.offload) == (3, 0.5, "bf16", "optimizer")  # the file
    assert parse_args([]).batch_size == 16 and parse_args([]).offload == "none"  # the defaults
    cfg = deepspeed_config(args.ds_base, world=2, micro_batch=args.batch_size, grad_accum=args.grad_accum,
                           zero_stage=args.zero_stage, offload=args.offload, dtype=args.dtype,
                           grad_clip=args.grad_clip, pin_memory=False)
    assert cfg["train_batch_size"] == 24 and cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 1000  # what no flag touches stays as written
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    # a config's own offload section (NVMe here) stays as written unless a flag changes it
    nvme = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"}},
            "bf16": {"enabled": False}, "fp16": {"enabled": False}}
    assert config_settings(nvme)["offload"] == "optimizer" and config_settings(nvme)["dtype"] == "fp32"
    kept = deepspeed_config(nvme, world=1, micro_batch=1, grad_accum=1, zero_stage=3, offload="optimizer",
                            dtype="fp32", grad_clip=1.0, pin_memory=False)
    assert kept["zero_optimization"]["offload_optimizer"]["nvme_path"] == "/nvme"
    off = {"zero_optimization": {"offload_optimizer": {"device": "none"}}, "bf16": {"enabled": False}}
    assert config_settings(off)["offload"] is None and config_settings(off)["dtype"] is None  # auto
    with pytest.raises(ValueError, match='"optimizer" section'):
        deepspeed_config({"optimizer": {"type": "Adam"}}, world=1, micro_batch=1, grad_accum=1, zero_stage=0,
                         offload="none", dtype="fp32", grad_clip=1.0, pin_memory=False)


def test_fine_tunes_a_hugging_face_llama_directory_and_chat_talks_to_it(tiny_data, tmp_path, sp_tokenizer):
    from conftest import hf_model
    base = tmp_path / "base"
    hf_model("gqa_tied", base, sp_tokenizer)
    out = tmp_path / "tuned"
    r = run_train("--init-from", str(base), "--data", str(tiny_data / "train.jsonl"), "--val-data",
                  str(tiny_data / "val.jsonl"), "--eval-data", "", "--out", str(out), "--steps", "4",
                  "--max-seq-len", "128", "--batch-size", "2", "--dtype", "fp32", "--lr", "1e-3")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    # the run started from the base weights: its step-0 validation loss is the base model's own
    from nanosft.data import pack
    from nanosft.evaluate import loss_and_ppl, validation_loss
    base_model, base_tok = load_model(base)
    template = ChatTemplate(base_tok)
    val, _ = render_conversations(load_jsonl(tiny_data / "val.jsonl"), template, 129)
    want, _ = loss_and_ppl(*validation_loss(base_model, pack(val, 129, template.pad)))
    assert math.isclose(m["val_loss_before"], want, rel_tol=1e-4)
    assert m["val_loss"] < m["val_loss_before"]  # and it learned from the chat data
    model, tok = load_model(out)
    assert model.cfg.dim == 64 and tok.vocab_size == 324  # the base shape, plus the chat markers
    r = run_chat("--ckpt", str(out), "--prompt", "Which is larger, 418 or 96?", "--max-new-tokens", "5")
    assert r.returncode == 0 and "Traceback" not in r.stderr


def test_a_sentencepiece_model_without_chat_markers_trains_and_chats(tiny_data, tmp_path, sp_tokenizer):
    """--tokenizer with a Llama-style tokenizer.model made by the sentencepiece library: the chat
    markers are added as control pieces (as for an --init-from base model), text encodes exactly as
    sentencepiece encodes it, and the trained run answers in chat.py."""
    import sentencepiece as spm
    out = tmp_path / "spm_tokenizer"
    r = run_train("--tokenizer", str(sp_tokenizer), "--data", str(tiny_data / "train.jsonl"), "--val-data",
                  str(tiny_data / "val.jsonl"), "--eval-data", "", "--out", str(out), "--steps", "3", "--dtype", "fp32",
                  *TINY)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    _, tok = load_model(out)
    ref = spm.SentencePieceProcessor(model_file=str(sp_tokenizer))
    assert tok.vocab_size == ref.vocab_size() + len(Tokenizer.CHAT_TOKENS)
    assert [tok.token_id(t) for t in Tokenizer.CHAT_TOKENS] == list(range(ref.vocab_size(), tok.vocab_size))
    for text in ("the number 12 is even, 你好 84", " two  spaces\nand a line"):
        assert tok.encode(text) == ref.encode(text)
    r = run_chat("--ckpt", str(out), "--prompt", "What is my name?", "--max-new-tokens", "5")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_packing_off_trains_a_conversation_per_row_and_reports_its_padding(tiny_run, tmp_path):
    data_dir, _ = tiny_run
    out = tmp_path / "unpacked"
    r = run_train("--data", str(data_dir / "train.jsonl"), "--val-data", "", "--eval-data", "", "--out", str(out),
                  "--steps", "5", "--dtype", "fp32", "--packing", "off", *TINY)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    off = json.loads((out / "metrics.json").read_text())["padding_fraction"]
    assert off < 0.05  # similar lengths side by side, the padding columns they share cut off
    assert f"padding: {off:.1%}" in r.stdout
    assert list(read_monitor(out)["Train_loss"]) == [1, 2, 3, 4, 5]


def test_two_files_blend_by_weight_with_a_held_out_split(tiny_data, tmp_path):
    records = load_jsonl(tiny_data / "train.jsonl")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.json"
    a.write_text("".join(json.dumps(r) + "\n" for r in records[:200]))
    alpaca = [{"instruction": m["messages"][0]["content"], "input": "", "output": m["messages"][1]["content"]}
              for m in records[200:250] if len(m["messages"]) == 2]
    b.write_text(json.dumps(alpaca))  # another format, another file
    out = tmp_path / "blend"
    r = run_train("--data", f"{a}:3", f"{b}:1", "--val-split", "0.1", "--val-data", "", "--eval-data", "",
                  "--out", str(out), "--steps", "2", "--dtype", "fp32", *TINY,
                  "--max-seq-len", "512")  # room for every conversation: none is left out
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    n = 180 + len(alpaca) - round(0.1 * len(alpaca))  # what remains of both after the split
    share_b = round(1 / 4 * n)
    assert f"data: {n} conversations per epoch blended {a} x{n - share_b}, {b} x{share_b}" in r.stdout, r.stdout[-3000:]
    assert f"; {20 + round(0.1 * len(alpaca))} held out for validation" in r.stdout
    assert "step 0: val loss" in r.stdout



def test_resume_reads_args_json_and_fills_in_settings_it_lacks(tmp_path):
    from nanosft.train_args import resumed_args
    (tmp_path / "args.json").write_text(json.dumps({"data": "chats.jsonl", "lr": 0.01, "out": str(tmp_path)}))
    args = resumed_args(argparse.Namespace(out=str(tmp_path), resume=True), {"resume", "out"})
    assert args.data == ["chats.jsonl"] and args.lr == 0.01 and args.resume
    assert args.packing == "on" and args.train_on == "all-assistant"  # the defaults of what it does not say


def test_monitor_csv_cut_short_by_a_kill_reads_up_to_the_cut_and_a_broken_row_is_named(tmp_path):
    (tmp_path / "monitor").mkdir()
    csv_file = tmp_path / "monitor" / "Train_loss.csv"
    csv_file.write_text("step,Train_loss\n1,2.5\n2,2.25\n3,")  # killed while writing step 3
    assert read_monitor(tmp_path) == {"Train_loss": {1: 2.5, 2: 2.25}}
    csv_file.write_text("step,Train_loss\n1,2.5\n2,2.25\n3,2.1")  # cut inside "3,2.1875": not a value to plot
    assert read_monitor(tmp_path) == {"Train_loss": {1: 2.5, 2: 2.25}}
    csv_file.write_text("step,Train_loss\n1,2.5\nx,y\n3,2.0\n")
    with pytest.raises(ValueError, match=f"{csv_file}:3: not a 'step,value' row"):
        read_monitor(tmp_path)


def test_trim_tensorboard_keeps_each_event_up_to_the_checkpoint_once(tmp_path):
    """What a resume does to TensorBoard's logs (the SIGKILL test in test_zero.py runs it for real):
    here the folder also holds a copy left by a resume killed halfway through an earlier trim."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter
    from nanosft.monitor import trim_tensorboard
    for _ in range(2):  # two files with the same events
        w = SummaryWriter(log_dir=str(tmp_path))
        for step in range(1, 11):
            w.add_scalar("Train/loss", 1.0 / step, step)
            w.add_scalar("Train/Samples/lr", 0.1 * step, 8 * step)  # counted in samples, 8 a step
        w.close()
    w = SummaryWriter(log_dir=str(tmp_path))  # the writer DeepSpeed opened for the resumed run
    w = trim_tensorboard(w, lambda tag: 6 * 8 if "Samples" in tag else 6)  # back to step 6
    w.add_scalar("Train/loss", 0.5, 7)  # the resumed run goes on
    w.close()
    assert len(os.listdir(tmp_path)) == 1
    events = EventAccumulator(str(tmp_path)).Reload()
    assert [(e.step, e.value) for e in events.Scalars("Train/loss")] == [(s, pytest.approx(1 / s)) for s in range(1, 7)] + [(7, 0.5)]
    assert [e.step for e in events.Scalars("Train/Samples/lr")] == [8 * s for s in range(1, 7)]


def test_resume_leaves_tensorboard_logs_outside_the_run_alone(tmp_path):
    """A TensorBoard section in --ds-config may write to a folder other runs share: not cut."""
    from types import SimpleNamespace
    from torch.utils.tensorboard import SummaryWriter
    from nanosft.monitor import trim_monitor
    w = SummaryWriter(log_dir=str(tmp_path / "shared"))
    w.add_scalar("Other/loss", 1.0, 100)
    w.flush()
    before = {p.name: p.read_bytes() for p in (tmp_path / "shared").iterdir()}
    engine = SimpleNamespace(monitor=SimpleNamespace(csv_monitor=None, tb_monitor=SimpleNamespace(summary_writer=w)))
    trim_monitor(engine, str(tmp_path / "run"), upto=6, samples_per_step=8)
    assert engine.monitor.tb_monitor.summary_writer is w
    assert {p.name: p.read_bytes() for p in (tmp_path / "shared").iterdir()} == before
    w.close()


def test_tensorboard_flag_and_quiet_log(tiny_run, tmp_path):
    data_dir, _ = tiny_run
    out = tmp_path / "tb"
    r = run_train("--data", str(data_dir / "train.jsonl"), "--val-data", "", "--eval-data", "", "--out", str(out),
                  "--steps", "6", "--dtype", "fp32", "--tensorboard", "--quiet", "--log-every", "3", *TINY)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert [line.split("  ")[0] for line in r.stdout.splitlines() if line.startswith("step ")] == ["step 3/6", "step 6/6"]
    assert "\r" not in r.stdout  # a log, not a redrawn bar

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    tb = {e.step: e.value for e in events.Scalars("Train/loss")}
    csv_log = read_monitor(out)["Train_loss"]
    assert list(tb) == list(csv_log) == [1, 2, 3, 4, 5, 6]
    assert all(math.isclose(tb[s], csv_log[s], rel_tol=1e-6) for s in tb)  # TensorBoard stores float32


def test_what_a_newcomer_would_otherwise_not_be_told(tiny_data, tmp_path):
    """A warm-up longer than the run, a run directory reused, the run runs/latest leads to, and an
    empty training file are each said in a line."""
    runs = tmp_path / "runs"
    common = ["--data", str(tiny_data / "train.jsonl"), "--val-data", "", "--eval-data", "", "--dtype", "fp32", *TINY]
    r = run_train(*common, "--out", str(runs / "a"), "--steps", "2", "--warmup-steps", "5")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "note: --warmup-steps 5 is longer than the run's 2 steps" in r.stdout and "holds an earlier run" not in r.stdout
    r = run_train(*common, "--out", str(runs / "a"), "--steps", "2")
    assert r.returncode == 0 and f"note: {runs / 'a'} holds an earlier run, which this one replaces" in r.stdout
    assert "note: --warmup-steps" not in r.stdout  # (TINY's 2 warm-up steps fit in 2 steps)
    r = run_train(*common, "--out", str(runs / "b"), "--steps", "1", "--init-from", str(runs / "latest"))
    assert r.returncode == 0 and f"from {runs / 'latest'} (-> {runs / 'a'})" in r.stdout, r.stderr[-2000:]
    r = run([sys.executable, os.path.join(ROOT, "chat.py"), "--ckpt", str(runs / "latest")], input="/quit\n")
    assert r.returncode == 0 and f"chat with {runs / 'latest'} (-> {runs / 'b'})" in r.stdout, r.stderr[-2000:]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    r = run_train("--data", str(empty), "--val-data", "", "--eval-data", "", "--out", str(tmp_path / "e"), *TINY)
    assert r.returncode != 0 and f"{empty}: nothing to train on (the file is empty)" in r.stderr
    assert "--max-seq-len" not in r.stderr and "Traceback" not in r.stderr


def test_epoch_ends_are_evaluated_only_when_epochs_last_eval_every_steps(tiny_data, tmp_path):
    """Tiny data ends an epoch every few steps: a generation evaluation each time would bury the log."""
    common = ["--data", str(tiny_data / "train.jsonl"), "--val-data", str(tiny_data / "val.jsonl"), "--eval-data",
              str(tiny_data / "eval.jsonl"), "--steps", "30", "--dtype", "fp32", *TINY, "--batch-size", "8"]  # ~10 steps an epoch
    short = run_train(*common, "--out", str(tmp_path / "short"), "--eval-every", "100")
    long = run_train(*common, "--out", str(tmp_path / "long"), "--eval-every", "5")
    assert short.returncode == long.returncode == 0, short.stderr[-2000:] + long.stderr[-2000:]
    assert "(end of epoch)" not in short.stdout and "(end of epoch)" in long.stdout


def test_the_plot_is_titled_with_the_runs_name_also_through_latest(tmp_path):
    from nanosft.plot import run_name
    (tmp_path / "20261204-164524").mkdir()
    (tmp_path / "latest").symlink_to("20261204-164524")
    assert run_name(tmp_path / "latest") == run_name(tmp_path / "20261204-164524") == "20261204-164524"



def test_a_checkpoint_keeps_the_current_gpus_random_state_and_restores_it_on_fewer_gpus(monkeypatch):
    """The CUDA path of the RNG state (no GPU needed: torch.cuda's calls are stand-ins): the current
    GPU's generator, not every visible GPU's, so a resume that sees fewer GPUs still loads."""
    from nanosft import distributed
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7, 8, 9], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored.append)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU's state was read"))
    state = distributed.rng_state()
    torch.manual_seed(1)  # the CPU generator moves on...
    distributed.set_rng_state(state)  # ...and comes back
    assert torch.equal(torch.get_rng_state(), state["torch"])
    assert len(restored) == 1 and restored[0].tolist() == [7, 8, 9]


def test_on_a_gpu_each_rank_takes_its_local_gpu_then_joins_over_nccl(monkeypatch):
    """setup_distributed's CUDA path, with torch.cuda and DeepSpeed's init as stand-ins: the rank's
    device is set before the process group starts (NCCL binds to the current device)."""
    from nanosft import distributed
    calls = []
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.deepspeed, "init_distributed", lambda dist_backend, verbose: calls.append(dist_backend))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 3)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    assert distributed.setup_distributed() == (torch.device("cuda", 1), 3, 4)
    assert calls == [("set_device", 1), "nccl"]


def test_the_gpu_config_scales_fp16_losses_dynamically_and_pins_offloaded_memory():
    """What a GPU run hands DeepSpeed (train.py passes pin_memory on CUDA): fp16 with the dynamic
    loss scale of configs/ds_config.json (from 2^16, halved after 2 overflows, doubled after 100
    clean steps), and page-locked CPU buffers for whatever is offloaded."""
    from nanosft.distributed import deepspeed_config
    from nanosft.train_args import parse_args
    cfg = deepspeed_config(parse_args([]).ds_base, world=8, micro_batch=4, grad_accum=2, zero_stage=3, offload="all",
                           dtype="fp16", grad_clip=1.0, pin_memory=True)
    assert cfg["fp16"] == {"enabled": True, "loss_scale": 0, "loss_scale_window": 100, "initial_scale_power": 16,
                           "hysteresis": 2, "min_loss_scale": 1} and not cfg["bf16"]["enabled"]
    zero = cfg["zero_optimization"]
    assert zero["offload_optimizer"] == zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert cfg["train_batch_size"] == 64
