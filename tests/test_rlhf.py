"""train.py --stage ppo|grpo (rlhf.py) promises: rollouts from the policy scored by a reward model
(PPO, with a critic started from it) or by exact match with the data's answer (GRPO), the KL to
the reference 0 while nothing has moved, logged per step (reward, KL, reply length, entropy, clip
fraction, value loss); rows whose mask covers the reply alone; and failures named: no reward
model, one that reads another tokenizer, no prompts, replies that are all empty (skipped, counted,
no NaN), a reward that is not finite (the run stops, no traceback, checkpoints left as they were)."""

import json
import math
import os
import random
import signal
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, kill_at, run, run_train

from nanosft.checkpoint import load_model, load_reward_model, save_model
from nanosft.data import load_jsonl, render_prompts
from nanosft.monitor import read_monitor
from nanosft.rlhf import answer_scores, rows_of
from nanosft.safetensors import load_file
from nanosft.template import ChatTemplate
from nanosft.tokenizer import Tokenizer

sys.path.insert(0, os.path.join(ROOT, "data"))
from generate import preference_pairs, write_jsonl  # noqa: E402  (data/generate.py)

SEQ = ["--max-seq-len", "128"]  # the tiny SFT model's context (conftest's TINY)
LOGGED = ("loss", "reward_mean", "reward_std", "kl", "reply_length", "entropy", "clip_fraction")


@pytest.fixture(scope="module")
def setup(tiny_run, tmp_path_factory):
    """(SFT run, its training data (prompts with answers), a reward model trained from the SFT run)."""
    data, sft = tiny_run
    here = tmp_path_factory.mktemp("rl")  # (not next to the SFT run: runs/latest there is test_train.py's)
    write_jsonl(here / "pairs.jsonl", preference_pairs(64, random.Random(5), set()))
    rm = here / "reward"
    r = run_train("--stage", "reward", "--init-from", str(sft), "--data", str(here / "pairs.jsonl"), "--val-data",
                  "", "--out", str(rm), "--steps", "4", "--dtype", "fp32", "--batch-size", "4", "--lr", "3e-2",
                  "--cache-dir", "", "--quiet", *SEQ)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return sft, data / "train.jsonl", rm


def rl_args(stage, setup, out, *flags, steps=3):
    sft, prompts, rm = setup
    return ["--stage", stage, "--init-from", str(sft), "--data", str(prompts), "--eval-data", "", "--out", str(out),
            "--steps", str(steps), "--dtype", "fp32", "--batch-size", "4", "--max-new-tokens", "12", "--lr", "3e-3",
            "--warmup-steps", "0", "--log-every", "1", "--cache-dir", "", *SEQ,
            "--threads", "1",  # (not measured at start-up: runs compared exactly round alike)
            *(["--reward-model", str(rm)] if stage == "ppo" else ["--group", "4"]), *flags]


def rl_run(stage, setup, out, *flags, steps=3):
    r = run_train(*rl_args(stage, setup, out, *flags, steps=steps))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return read_monitor(out)


def test_rows_hold_prompt_then_reply_with_the_mask_on_the_replys_targets_only():
    ids, mask, last = rows_of([[1, 2, 3], [4]], [[7, 8], [9, 10, 11]], pad_id=0, device="cpu")
    assert ids.tolist() == [[1, 2, 3, 7, 8], [4, 9, 10, 11, 0]]
    # mask over targets ids[:, 1:]: row 0's targets are 2 3 7 8 -> the last two; row 1's 9 10 11 0
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]] and last.tolist() == [4, 3]


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_a_run_logs_rewards_kl_length_entropy_and_clipping_with_no_drift_at_step_one(setup, tmp_path, stage):
    m = rl_run(stage, setup, tmp_path / stage, "--ppo-epochs", "2", *(["--whiten"] if stage == "ppo" else []))
    names = LOGGED + (("value_loss",) if stage == "ppo" else ())
    for name in names:
        assert sorted(m[f"Train_{name}"]) == [1, 2, 3], name
        assert all(math.isfinite(v) for v in m[f"Train_{name}"].values()), name
    assert m["Train_kl"][1] == 0.0  # the rollout of step 1 is the reference's own
    assert 0 < m["Train_reply_length"][1] <= 12 and m["Train_entropy"][1] > 0
    assert all(0 <= v <= 1 for v in m["Train_clip_fraction"].values())
    if stage == "grpo":  # exact match: each reply's reward is 0 or 1
        assert 0 <= m["Train_reward_mean"][1] <= 1
    sft, _, _ = setup
    moved = load_model(tmp_path / stage)[0].state_dict()
    start = load_model(sft)[0].state_dict()
    assert any(not torch.equal(moved[k], start[k]) for k in start) or stage == "grpo"  # (GRPO: only if a group differed)


def test_sft_data_joins_the_actors_loss_and_weighted_zero_changes_nothing(setup, tmp_path):
    _, chats, _ = setup
    plain = rl_run("ppo", setup, tmp_path / "plain")
    zero = rl_run("ppo", setup, tmp_path / "zero", "--sft-data", str(chats), "--sft-coef", "0")
    mixed = rl_run("ppo", setup, tmp_path / "mixed", "--sft-data", str(chats), "--sft-coef", "1")
    assert zero["Train_loss"] == plain["Train_loss"] and zero["Train_kl"] == plain["Train_kl"]
    assert mixed["Train_kl"][1] == plain["Train_kl"][1] == 0.0 and mixed["Train_kl"][3] != plain["Train_kl"][3]
    assert sorted(mixed["Train_sft_loss"]) == [1, 2, 3] and all(0 < v < 20 for v in mixed["Train_sft_loss"].values())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])  # bf16: the average reads the fp32 masters, as the saved model does
def test_ema_averages_the_weights_step_by_step_checkpointed_and_saved_as_a_model(setup, tmp_path, dtype):
    sft, chats, _ = setup
    rl_run("ppo", setup, tmp_path / "run", "--ema", "0.75", "--save-every", "1", "--keep-checkpoints", "5",
           "--dtype", dtype, "--eval-data", str(chats.parent / "eval.jsonl"), steps=2)
    step1 = load_file(tmp_path / "run" / "checkpoints" / "step00000001" / "ema.safetensors")  # the average after step 1
    last = load_model(tmp_path / "run")[0].state_dict()  # the weights after step 2
    ema = load_model(tmp_path / "run" / "ema")[0].state_dict()
    start = load_model(sft)[0].state_dict()
    assert step1.keys() == {n for n, _ in load_model(sft)[0].named_parameters()}  # every trained weight
    for name, avg in step1.items():
        torch.testing.assert_close(ema[name], 0.75 * avg + 0.25 * last[name], rtol=0, atol=1e-6)
    assert any(not torch.equal(step1[k], start[k]) for k in step1)  # it moved, and not as far as the weights
    assert any(not torch.equal(ema[k], last[k]) for k in step1)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "overall" in metrics["ema"]["exact_match"]  # evaluated like the last weights


def test_a_missing_or_mismatched_reward_model_and_an_empty_prompt_set_are_named(setup, tmp_path):
    sft, prompts, rm = setup
    r = run_train(*[a for a in rl_args("ppo", setup, tmp_path / "a") if a not in ("--reward-model", str(rm))])
    assert r.returncode == 2 and "--stage ppo needs --reward-model" in r.stderr
    # a reward model saved with another tokenizer (a larger vocabulary learnt from the same data)
    other = tmp_path / "other_rm"
    rm_model, tok = load_reward_model(rm)
    texts = [m["content"] for r in load_jsonl(prompts) for m in r["messages"]]
    save_model(other, rm_model.state_dict(), rm_model.cfg, Tokenizer.train(texts, tok.vocab_size + 40))
    r = run_train(*rl_args("ppo", (sft, prompts, other), tmp_path / "b"))
    assert r.returncode == 1 and "Traceback" not in r.stderr and "is not the policy's" in r.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = run_train(*rl_args("grpo", (sft, empty, rm), tmp_path / "c"))
    assert r.returncode == 1 and "Traceback" not in r.stderr and "nothing to train on" in r.stderr


def test_replies_that_are_all_empty_are_counted_and_skipped(setup, tmp_path):
    """A model that always ends its reply at once: every step is skipped (no update, no NaN)."""
    sft, prompts, rm = setup
    model, tok = load_model(sft)
    template = ChatTemplate(tok)
    with torch.no_grad():
        for layer in model.layers:  # the blocks add nothing: a position's state is its token's embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        # every prompt ends with the same token (the assistant's header): point the end token's
        # output row along the state there, so that the end token outweighs all others
        h = model.norm(model.embed_tokens.weight[template.render_prompt([{"role": "user", "content": "hi"}])[-1]])
        head = model.lm_head.weight if model.lm_head is not None else model.embed_tokens.weight
        head[template.end] = 100 * h / h.norm()
    silent = tmp_path / "silent"
    save_model(silent, model.state_dict(), model.cfg, tok)
    m = rl_run("grpo", (silent, prompts, rm), tmp_path / "run", steps=2)
    assert m["Train_empty_replies"][1] == 16 and m["Train_reply_length"][1] == 0  # 4 prompts x 4 replies
    assert m["Train_loss"][1] == 0 and all(math.isfinite(v) for v in m["Train_entropy"].values())


@pytest.mark.parametrize("norm", ["answers", "none"])  # found on the data's answers before training, or in a rollout
def test_a_reward_that_is_not_finite_stops_the_run_with_its_checkpoints_intact(setup, tmp_path, norm):
    sft, prompts, rm = setup
    bad = tmp_path / "nan_rm"
    rm_model, tok = load_reward_model(rm)
    rm_model.score.weight.data.fill_(float("nan"))
    save_model(bad, rm_model.state_dict(), rm_model.cfg, tok)
    r = run_train(*rl_args("ppo", (sft, prompts, bad), tmp_path / "run", "--reward-norm", norm))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "non-finite reward" in r.stderr and "the last checkpoint is intact" in r.stderr
    assert ("the data's answers" in r.stderr) == (norm == "answers")


def test_scores_are_normalized_by_the_reward_models_scores_of_the_datas_own_answers(setup):
    """answer_scores writes each answer as the policy would (content and end token after the
    prompt): the same scores as the whole conversation rendered by the template and read at its
    end token."""
    _, prompts, rm = setup
    model, tok = load_reward_model(rm)
    torch.manual_seed(0)
    model.score.weight.data.normal_()  # (a head that tells these answers apart: 4 training steps barely do)
    template = ChatTemplate(tok)
    records = load_jsonl(prompts)[:40]
    run = SimpleNamespace(template=template, prompts=render_prompts(records, template, 128)[0], reward=model,
                          device="cpu")
    mean, std = answer_scores(run, n=40, batch=16)
    with torch.no_grad():
        whole = torch.tensor([model(torch.tensor([template.render(r["messages"])[0]])).item() for r in records])
    assert whole.std() > 0.1
    torch.testing.assert_close((mean, std), (whole.mean().item(), whole.std(unbiased=False).item()), rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# ZeRO and resume (slow: real training processes, some under the launcher)

def launch(nproc, out, stage, setup, *flags, steps=5):
    args = rl_args(stage, setup, out, *flags, steps=steps)
    if nproc == 1:
        return [sys.executable, os.path.join(ROOT, "train.py"), *args]
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    port = str(29600 + abs(hash(str(out))) % 300)
    return [launcher, "--num_gpus", str(nproc), "--master_port", port, os.path.join(ROOT, "train.py"), *args]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_zero2_and_zero3_on_two_ranks_give_stage0s_first_five_steps(setup, tmp_path, stage):
    """Two ranks each way (each rank draws its own rollouts, seeded by seed, step and rank); under
    ZeRO-3 the rollouts gather the actor's sharded weights, and reference, reward model and critic
    are sharded too."""
    got = {}
    for zero in ("0", "2", "3"):
        r = run(launch(2, tmp_path / f"z{zero}", stage, setup, "--zero-stage", zero, "--ppo-epochs", "2", "--ema", "0.9"))
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        got[zero] = read_monitor(tmp_path / f"z{zero}")
    if stage == "ppo":  # the actor moves (a comparison that can fail); the tiny GRPO model earns no reward yet
        assert len(set(got["0"]["Train_kl"].values())) > 1 and len(set(got["0"]["Train_loss"].values())) > 1
    for name in ("Train_loss", "Train_reward_mean", "Train_kl") + (("Train_value_loss",) if stage == "ppo" else ()):
        assert len(got["0"][name]) == 5
        for step in got["0"][name]:
            for zero in ("2", "3"):
                assert abs(got["0"][name][step] - got[zero][name][step]) <= 1e-4, (name, step, zero)
    ema = {zero: load_model(tmp_path / f"z{zero}" / "ema")[0].state_dict() for zero in ("0", "2", "3")}
    for zero in ("2", "3"):  # the average of weights gathered from the shards (every rank takes part)
        assert all(torch.allclose(ema["0"][k], ema[zero][k], rtol=0, atol=1e-4) for k in ema["0"]), zero


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_a_run_killed_with_sigkill_resumes_with_the_same_rollouts_and_losses(setup, tmp_path, stage):
    flags = ["--save-every", "3", "--ppo-epochs", "2", "--ema", "0.9"]
    whole = tmp_path / "whole"
    r = run(launch(1, whole, stage, setup, *flags, steps=6))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    killed = tmp_path / "killed"
    assert kill_at(launch(1, killed, stage, setup, *flags, steps=6), 4) == -signal.SIGKILL
    assert not (killed / "metrics.json").exists()
    r = run([sys.executable, os.path.join(ROOT, "train.py"), "--out", str(killed), "--resume"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"resumed {killed} at step 3" in r.stdout
    for name in ("Train_loss", "Train_reward_mean", "Train_kl", "Train_reply_length"):
        want, got = ((d / "monitor" / f"{name}.csv").read_text() for d in (whole, killed))
        assert got == want, name
    for run_dir in ("", "ema"):  # the weights, and their average (from the checkpoint's)
        a, b = load_model(whole / run_dir)[0].state_dict(), load_model(killed / run_dir)[0].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), run_dir
