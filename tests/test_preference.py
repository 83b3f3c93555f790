"""train.py --stage reward and --stage dpo promise (preference.py, reward.py, dpo.py):

- pairs are batched chosen rows first, each row ending at its reply's end token, and every pair is
  dealt once an epoch, to one rank;
- DPO's reference log-probabilities are the starting model's, computed once (each pair alone, with
  no padding, gives the same numbers); at step 0 the loss is ln 2 and every reward is 0;
- a reward run saves a directory transformers' AutoModelForSequenceClassification loads and scores
  like nanosft, to 1e-4;
- bad pairs stop a run naming file and line, or are skipped and counted; a prompt too long for
  --max-seq-len loses its oldest exchanges, never a reply;
- (slow) ZeRO 1-3 on 2 CPU ranks give stage 0's losses to 1e-4, and a run killed with SIGKILL
  resumes with exactly the losses of one never interrupted, for both stages."""

import json
import math
import os
import random
import re
import signal
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, kill_at, run, run_train

from nanosft.checkpoint import load_model, load_reward_model
from nanosft.data import (Batches, PairBatches, load_conversations, load_pairs, pair_batch, render_conversations,
                          render_pairs)
from nanosft.dpo import reply_logps
from nanosft.loss import masked_nll
from nanosft.monitor import read_monitor
from nanosft.template import ChatTemplate

sys.path.insert(0, os.path.join(ROOT, "data"))
from generate import preference_pairs, write_jsonl  # noqa: E402  (data/generate.py)

SEQ = ["--max-seq-len", "128"]  # the tiny SFT model's context (conftest's TINY)


@pytest.fixture(scope="module")
def pairs(tiny_run):
    """(SFT run, pairs file, held-out pairs file): max prompts, the larger number chosen."""
    data, sft = tiny_run
    rng = random.Random(5)
    write_jsonl(data / "pairs.jsonl", preference_pairs(96, rng, set()))
    write_jsonl(data / "pairs_val.jsonl", preference_pairs(20, rng, set()))
    return sft, data / "pairs.jsonl", data / "pairs_val.jsonl"


def pair_run(stage, pairs, out, *flags, steps=6):
    sft, train, val = pairs
    r = run_train("--stage", stage, "--init-from", str(sft), "--data", str(train), "--val-data", str(val),
                  "--out", str(out), "--steps", str(steps), "--dtype", "fp32", "--batch-size", "4", "--warmup-steps",
                  "0", "--lr", "3e-3", "--cache-dir", "", "--quiet", *SEQ,
                  "--threads", "1", *flags)  # (not measured at start-up: runs compared exactly round alike)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def rows(pairs):
    """The training pairs as train.py renders them, with the SFT model's tokenizer."""
    sft, train, _ = pairs
    _, tok = load_model(sft)
    records, _ = load_pairs(train)
    samples, _ = render_pairs(records, ChatTemplate(tok), 129)
    return samples, ChatTemplate(tok).pad


# -----------------------------------------------------------------------------
# batches

def test_a_pair_batch_holds_chosen_rows_then_rejected_each_ending_at_its_end_token(pairs):
    samples, pad = rows(pairs)
    b = pair_batch(samples, [3, 1], pad)
    assert b["ids"].shape[0] == 4 and b["index"].tolist() == [3, 1]
    for row, (ids, mask) in enumerate([samples[3][0], samples[1][0], samples[3][1], samples[1][1]]):
        n = int(b["length"][row])
        assert n == np.flatnonzero(mask)[-1] + 1  # the reply's end token is the row's last real token
        assert b["ids"][row, :n].tolist() == ids[:n].tolist() and b["mask"][row, :n].tolist() == mask[:n].tolist()
        assert (b["ids"][row, n:] == pad).all() and (b["mask"][row, n:] == 0).all()


def test_pair_batches_deal_every_pair_once_an_epoch_to_one_rank_and_resume_where_they_were():
    samples = [((np.arange(3), np.array([0, 1, 1])), (np.arange(4), np.array([0, 0, 1, 1])))] * 11
    ranks = [PairBatches(samples, 0, 2, seed=3, rank=r, world=2) for r in range(2)]
    shares = [b.rows["index"].tolist() for b in ranks]  # epoch 0: 5 pairs each, the 11th sits it out
    assert len(set(shares[0] + shares[1])) == 10 and not set(shares[0]) & set(shares[1])
    got = [ranks[0].next()["index"].tolist() for _ in range(2)]
    assert got[0] + got[1] == shares[0][:4] and ranks[0].epoch_done
    state = ranks[0].state_dict()
    nxt = ranks[0].next()["index"].tolist()
    assert nxt[0] == shares[0][4]  # the pair left over goes first in the next epoch
    again = PairBatches(samples, 0, 2, seed=3, rank=0, world=2)
    again.load_state_dict(state)
    assert again.next()["index"].tolist() == nxt and [again.next()["index"].tolist() for _ in range(3)] == \
        [ranks[0].next()["index"].tolist() for _ in range(3)]


# -----------------------------------------------------------------------------
# DPO

def test_dpo_starts_at_ln2_with_zero_rewards_against_the_starting_models_log_probabilities(pairs, tmp_path):
    out = pair_run("dpo", pairs, tmp_path / "dpo", "--log-every", "1")
    m = read_monitor(out)
    assert math.isclose(m["Train_loss"][1], math.log(2), abs_tol=1e-6)
    for name in ("chosen", "rejected", "margins"):
        assert abs(m[f"Train_rewards_{name}"][1]) < 1e-6
    assert math.isclose(m["Eval_pair_loss"][0], math.log(2), abs_tol=1e-6)
    assert m["Eval_pair_loss"][6] < math.log(2)  # it learns (on held-out pairs)

    # the reference: each pair's replies scored alone by the SFT model, no batch, no padding
    with np.load(out / "reference_logps.npz") as z:
        ref = z["train"]
    samples, _ = rows(pairs)
    assert len(samples) == len(ref)
    model, _ = load_model(pairs[0])
    with torch.no_grad():
        for i in (0, 17, len(ref) - 1):
            for side, (ids, mask) in enumerate(samples[i]):
                ids = torch.tensor(ids[None], dtype=torch.long)
                want = reply_logps(model(ids[:, :-1]), ids[:, 1:], torch.tensor(mask[None, 1:]))
                assert abs(ref[i, side] - want.item()) < 1e-4
    assert not torch.equal(load_model(out)[0].state_dict()["layers.0.mlp.down_proj.weight"],
                           model.state_dict()["layers.0.mlp.down_proj.weight"])


def test_label_smoothing_and_beta_reach_the_loss(pairs, tmp_path):
    plain = read_monitor(pair_run("dpo", pairs, tmp_path / "a", "--log-every", "1", steps=2))
    smoothed = read_monitor(pair_run("dpo", pairs, tmp_path / "b", "--log-every", "1", "--beta", "0.5",
                                     "--label-smoothing", "0.2", steps=2))
    assert math.isclose(smoothed["Train_loss"][1], math.log(2), abs_tol=1e-6)  # (d = 0: ln 2 whatever eps)
    assert smoothed["Train_rewards_margins"][2] != plain["Train_rewards_margins"][2]


def test_a_live_reference_model_gives_the_losses_of_the_precomputed_table(pairs, tmp_path):
    """--reference live: a frozen copy of the starting model scores each batch (under DeepSpeed
    beside the policy) instead of reading reference_logps.npz: the same DPO, step by step."""
    pre = read_monitor(pair_run("dpo", pairs, tmp_path / "pre", "--log-every", "1", "--eval-every", "2", steps=4))
    live = read_monitor(pair_run("dpo", pairs, tmp_path / "live", "--log-every", "1", "--eval-every", "2",
                                 "--reference", "live", steps=4))
    assert not (tmp_path / "live" / "reference_logps.npz").exists()
    for name in ("Train_loss", "Train_rewards_margins", "Eval_pair_loss", "Eval_reward_margin"):
        assert pre[name].keys() == live[name].keys() and len(pre[name]) >= 3, name
        for step in pre[name]:
            assert abs(pre[name][step] - live[name][step]) < 1e-5, (name, step)
    assert abs(pre["Train_loss"][4] - pre["Train_loss"][1]) > 1e-3  # (the policy moved: the two could differ)


def test_sft_data_adds_its_mean_nll_times_sft_coef_to_the_pairs_loss(pairs, tmp_path):
    """--sft-data: each micro-batch of pairs comes with --batch-size conversations, their loss (mean
    NLL per supervised token, checked against the SFT model scoring them here) times --sft-coef
    joins the pairs'. Weighted 0 it changes nothing; weighted 1 it changes the steps after the first."""
    sft, train, _ = pairs
    chats = train.parent / "train.jsonl"
    runs = {name: read_monitor(pair_run("dpo", pairs, tmp_path / name, "--log-every", "1", *flags, steps=3))
            for name, flags in (("plain", []), ("zero", ["--sft-data", str(chats), "--sft-coef", "0"]),
                                ("mixed", ["--sft-data", str(chats), "--sft-coef", "1"]))}
    assert runs["zero"]["Train_loss"] == runs["plain"]["Train_loss"] and "Train_sft_loss" not in runs["plain"]
    assert runs["mixed"]["Train_loss"][1] == runs["plain"]["Train_loss"][1]  # (the same weights at step 1)
    assert runs["mixed"]["Train_loss"][3] != runs["plain"]["Train_loss"][3]

    # step 1's SFT loss: the first micro-batches of an unpacked Batches, scored by the SFT model
    model, tok = load_model(sft)
    records, _ = load_conversations(chats)
    samples, _ = render_conversations(records, ChatTemplate(tok), 129)
    batches = Batches(samples, 129, ChatTemplate(tok).pad, 4, seed=1337, packing=False)
    with torch.no_grad():
        b = batches.next()  # (--batch-size 4, one micro-batch a step)
        total, count = masked_nll(model(b["idx"], pos=b["pos"], doc=b["doc"]), b["targets"], b["loss_mask"])
    assert math.isclose(runs["mixed"]["Train_sft_loss"][1], (total / count).item(), rel_tol=1e-5)


# -----------------------------------------------------------------------------
# reward model

def test_a_reward_run_saves_a_sequence_classifier_transformers_scores_alike(pairs, tmp_path):
    import transformers
    out = pair_run("reward", pairs, tmp_path / "rm", "--lr", "3e-2", steps=12)  # (the head starts at zero)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["before"]["pair_accuracy"] == 0.0  # a fresh head scores every reply 0
    assert metrics["after"]["pair_loss"] != metrics["before"]["pair_loss"]  # trained (the test model is too small to learn much)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 1

    rm, tok = load_reward_model(out)
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    samples, pad = rows(pairs)
    assert pad == cfg["pad_token_id"]
    b = pair_batch(samples, list(range(8)), pad)  # padded rows of several lengths
    with torch.no_grad():
        ours = rm(b["ids"], b["length"] - 1)
        theirs = ref(b["ids"]).logits[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert ours.abs().max() > 1e-3  # (trained: not the fresh head's zeros)


def test_center_rewards_reaches_the_reward_models_loss_and_centres_its_scores(pairs, tmp_path):
    plain = pair_run("reward", pairs, tmp_path / "plain", "--lr", "3e-2", steps=12)
    centred = pair_run("reward", pairs, tmp_path / "centred", "--lr", "3e-2", "--center-rewards", "1", steps=12)
    a, b = read_monitor(plain)["Train_loss"], read_monitor(centred)["Train_loss"]
    assert a[1] == b[1] and a[12] != b[12]  # (a fresh head scores 0: the term starts at 0)
    offset = [abs(m["reward_chosen"] + m["reward_rejected"])
              for m in (json.loads((d / "metrics.json").read_text())["after"] for d in (plain, centred))]
    assert offset[1] < offset[0], offset


def test_a_pad_token_that_is_the_end_token_is_not_what_the_saved_reward_model_pads_with(pairs, tmp_path):
    """Llama 3's and SmolLM2's pad token is their end of turn: transformers, which reads a row's
    score at its last token that is not padding, would read before the end token."""
    import transformers
    from nanosft.checkpoint import save_model
    from nanosft.reward import RewardModel
    model, tok = load_model(pairs[0])
    tok.pad_id = ChatTemplate(tok).end
    assert ChatTemplate(tok).pad == ChatTemplate(tok).end
    rm = RewardModel(model)
    with torch.no_grad():
        rm.score.weight.normal_()
    state = {k: v.detach().clone() for k, v in rm.state_dict().items()}
    save_model(tmp_path / "rm", state, model.cfg, tok)
    pad = json.loads((tmp_path / "rm" / "config.json").read_text())["pad_token_id"]
    assert pad != ChatTemplate(tok).end
    samples, _ = rows(pairs)
    b = pair_batch(samples, list(range(6)), pad)
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        torch.testing.assert_close(rm.eval()(b["ids"], b["length"] - 1), ref(b["ids"]).logits[:, 0], rtol=1e-4, atol=1e-4)


def test_a_resumed_dpo_run_refuses_pair_files_that_changed(pairs, tmp_path):
    sft, train, val = pairs
    data = tmp_path / "pairs.jsonl"
    data.write_text(train.read_text(encoding="utf-8"), encoding="utf-8")
    out = pair_run("dpo", (sft, data, val), tmp_path / "run", "--save-every", "2", steps=4)
    data.write_text("".join(data.read_text(encoding="utf-8").splitlines(keepends=True)[:-8]), encoding="utf-8")
    r = run_train("--out", str(out), "--resume")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "reference_logps.npz" in r.stderr and "the pair files changed since the run started" in r.stderr


# -----------------------------------------------------------------------------
# bad input

def test_bad_pairs_stop_the_run_naming_the_line_or_are_skipped_and_counted(pairs, tmp_path):
    sft, train, val = pairs
    bad = tmp_path / "bad.jsonl"
    lines = train.read_text(encoding="utf-8").splitlines()
    same = json.loads(lines[1])
    same["rejected"] = same["chosen"]
    lines[1] = json.dumps(same)
    lines[4] = json.dumps({"prompt": "Human: hi Assistant:", "chosen": "", "rejected": " no"})
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    common = ["--stage", "dpo", "--init-from", str(sft), "--data", str(bad), "--val-data", "", "--steps", "1",
              "--dtype", "fp32", "--cache-dir", "", *SEQ]
    r = run_train(*common, "--out", str(tmp_path / "stop"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"{bad}:2:" in r.stderr and f"{bad}:5:" in r.stderr
    r = run_train(*common, "--out", str(tmp_path / "skip"), "--skip-invalid")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "skip" / "metrics.json").read_text())["invalid_records_skipped"] == 2


def test_a_long_prompt_loses_its_oldest_exchanges_and_a_pair_that_cannot_fit_is_counted(pairs, tmp_path):
    sft, _, _ = pairs
    long = tmp_path / "long.jsonl"
    history = [{"role": r, "content": " ".join(["apple"] * 30)} for r in ("user", "assistant")] * 3
    recs = [{"prompt": history + [{"role": "user", "content": f"Which is larger, {a} or {a + 1}?"}],
             "chosen": [{"role": "assistant", "content": str(a + 1)}],
             "rejected": [{"role": "assistant", "content": str(a)}]} for a in range(8)]
    recs.append({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "x " * 200}],
                 "rejected": [{"role": "assistant", "content": "no"}]})
    write_jsonl(long, recs)
    r = run_train("--stage", "dpo", "--init-from", str(sft), "--data", str(long), "--val-data", "", "--steps", "1",
                  "--dtype", "fp32", "--cache-dir", "", "--max-seq-len", "64", "--batch-size", "2", "--out",
                  str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "8 lost their oldest exchanges to fit --max-seq-len 64; 1 left out" in r.stdout
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["conversations_truncated"] == 8 and m["conversations_dropped"] == 1


def test_data_stats_describes_pairs_with_both_replies_marked(pairs):
    sft, train, _ = pairs
    r = run([sys.executable, "-m", "nanosft.data", "stats", str(train), "--tokenizer", str(sft), "--max-seq-len", "128"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("96 preference pairs in 1 file(s): 96 in trl format")
    fit, cut, out = map(int, re.search(r"--max-seq-len 128: (\d+) fit, (\d+) lose .*, (\d+) are left out", r.stdout).groups())
    assert fit + cut + out == 96 and fit > 0
    chosen, rejected = (next(ln for ln in r.stdout.splitlines() if ln.startswith(f"  {side}: ")) for side in ("chosen", "rejected"))
    assert "[<|end|>]" in chosen and "[<|end|>]" in rejected and chosen != rejected


def test_a_pair_stage_needs_a_model_to_start_from_and_pairs_to_read(pairs):
    r = run_train("--stage", "reward", "--data", str(pairs[1]))
    assert r.returncode == 2 and "--init-from" in r.stderr
    r = run_train("--stage", "dpo", "--init-from", str(pairs[0]), "--data", str(pairs[1]), "--format", "sharegpt")
    assert r.returncode == 2 and "--format sharegpt is a format of chats, --stage dpo reads pairs" in r.stderr
    r = run_train("--stage", "reward", "--init-from", str(pairs[0]), "--data", str(pairs[1]), "--eval-data", str(pairs[1]))
    assert r.returncode == 2 and "--eval-data: a reward model scores replies" in r.stderr


# -----------------------------------------------------------------------------
# ZeRO and resume (slow: real training processes, some under the launcher)

def launch(nproc, out, stage, pairs, *flags, steps=8):
    """stage: reward, dpo, dpo+sft (DPO with the tiny SFT data's loss mixed in) or dpo+live (DPO
    with --reference live)."""
    sft, train, val = pairs
    if stage == "dpo+sft":
        stage, flags = "dpo", ["--sft-data", str(train.parent / "train.jsonl"), "--sft-coef", "0.5", *flags]
    if stage == "dpo+live":
        stage, flags = "dpo", ["--reference", "live", *flags]
    common = ["--stage", stage, "--init-from", str(sft), "--data", str(train), "--val-data", str(val), "--out",
              str(out), "--steps", str(steps), "--dtype", "fp32", "--warmup-steps", "0",
              # (a reward model's head starts at zero: its first steps are the head's alone, hence a larger rate)
              "--lr", "3e-2" if stage == "reward" else "3e-3", "--cache-dir", "", "--log-every", "1", *SEQ, *flags]
    if nproc == 1:
        return [sys.executable, os.path.join(ROOT, "train.py"), *common]
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    port = str(29300 + abs(hash(str(out))) % 300)
    return [launcher, "--num_gpus", str(nproc), "--master_port", port, os.path.join(ROOT, "train.py"), *common]


def losses(out):
    return list(read_monitor(out)["Train_loss"].values())


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["reward", "dpo", "dpo+sft", "dpo+live"])
def test_zero_stages_on_two_ranks_give_stage0s_losses(pairs, tmp_path, stage):
    """8 pairs a step: 1 rank x 4 pairs x 2 micro-batches, or 2 ranks x 2 x 2 (or 2 x 1 x 4 for
    stage 3, with gradient checkpointing)."""
    r = run(launch(1, tmp_path / "s0", stage, pairs, "--batch-size", "4", "--grad-accum", "2"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ref = losses(tmp_path / "s0")
    assert len(ref) == 8 and max(abs(x - ref[0]) for x in ref) > 0.01  # the weights move: a comparison that can fail
    for zero, batch in (("1", "2"), ("2", "2"), ("3", "1")):
        flags = ["--zero-stage", zero, "--batch-size", batch, "--grad-accum", str(4 // int(batch))]
        r = run(launch(2, tmp_path / f"s{zero}", stage, pairs, *flags,
                       *(["--gradient-checkpointing"] if zero == "3" else [])))
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        for step, (a, b) in enumerate(zip(ref, losses(tmp_path / f"s{zero}")), 1):
            # to 1e-4 (a pair loss is ~0.7): ranks add gradients in another order, and 8 Adam steps
            # carry the rounding on (ZeRO-2's reward loss: 8e-5 apart at step 8 on Sapphire Rapids)
            assert abs(a - b) <= 1e-4, f"{stage}, step {step}: stage 0 loss {a}, ZeRO-{zero} loss {b}"


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["reward", "dpo", "dpo+sft"])
def test_a_run_killed_with_sigkill_resumes_with_the_same_losses(pairs, tmp_path, stage):
    # 96 pairs, 8 a step: the first epoch ends at step 12; killed after step 17, resumed from 16
    # --threads 1: the threads measured at start-up could differ between the two runs on a busy
    # machine, and with them the order of a sum's rounding (1e-7 apart at step 4, measured)
    flags = ["--batch-size", "4", "--grad-accum", "2", "--save-every", "8", "--threads", "1"]
    whole = tmp_path / "whole"
    r = run(launch(1, whole, stage, pairs, *flags, steps=22))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    killed = tmp_path / "killed"
    assert kill_at(launch(1, killed, stage, pairs, *flags, steps=22), 17) == -signal.SIGKILL
    assert not (killed / "metrics.json").exists()
    r = run([sys.executable, os.path.join(ROOT, "train.py"), "--out", str(killed), "--resume"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"resumed {killed} at step 16 (epoch 1)" in r.stdout
    names = ["Train_loss", "Train_rewards_chosen", "Train_rewards_margins", "Train_rewards_accuracies", "Eval_pair_loss"]
    names += ["Train_sft_loss"] if stage == "dpo+sft" else []  # (the SFT batches resume where they were too)
    for name in names:
        want, got = ((d / "monitor" / f"{name}.csv").read_text() for d in (whole, killed))
        assert got == want, name
    load = load_reward_model if stage == "reward" else load_model
    a, b = load(whole)[0].state_dict(), load(killed)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
