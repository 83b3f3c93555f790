"""
Pictures of a run: runs/<name>/loss.png, training and validation loss against tokens seen, with
the learning rate on a second axis (a PPO or GRPO run: its mean reward, and its KL to the reference).

    python -m nanosft.plot runs/latest        # or: make plot RUN=runs/latest

The numbers come from the run's DeepSpeed monitor CSVs (train.py logs through DeepSpeed's own
monitor): runs/<name>/monitor/<Group>_<name>.csv, one file per quantity, each a "step,<name>"
header and then a row per logged step, e.g. Train_loss.csv, Train_tokens.csv, Train_lr.csv,
Eval_val_loss.csv, read back by monitor.py's read_monitor. train.py draws the plot at the end of a run.
"""

import argparse
import math
import os
import sys

from nanosft.monitor import read_monitor


def smooth(values, weight=0.95):
    """Exponential moving average, without the bias towards its zero start (as Adam corrects it).
    A non-finite loss (an fp16 overflow) is passed over, so it cannot poison the rest of the curve."""
    out, avg, n = [], 0.0, 0
    for v in values:
        if math.isfinite(v):
            avg, n = weight * avg + (1 - weight) * v, n + 1
        out.append(avg / (1 - weight ** n) if n else float("nan"))
    return out


def curves(run_dir):
    """-> {"train": [(tokens seen, loss), ...], "val": [...], "lr": [...], "pairs": bool}: the run's
    curves against the tokens seen at each logged step. (A reward or DPO run, "pairs", has its
    held-out pairs' loss for validation loss, and a loss per pair.)"""
    s = read_monitor(run_dir)
    tokens = {0: 0.0, **s.get("Train_tokens", {})}  # step -> tokens seen after it
    pairs = "Train_rewards_margins" in s  # (a reward or DPO run)
    rl = "Train_reward_mean" in s  # (a PPO or GRPO run: its reward, and the KL to the reference)
    picked = {"train": "Train_loss", "val": "Eval_pair_loss" if pairs else "Eval_val_loss", "lr": "Train_lr",
              "reward": "Train_reward_mean", "kl": "Train_kl"}
    return {"pairs": pairs, "rl": rl, **{k: [(tokens[st], v) for st, v in sorted(s.get(name, {}).items()) if st in tokens]
                                         for k, name in picked.items()}}


def run_name(run_dir):
    """The run's own name, also when it is reached through runs/latest (a link)."""
    return os.path.basename(os.path.realpath(run_dir))


def plot_run(run_dir, path=None):
    """Draw loss.png from the run's monitor CSVs; returns its path."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    c = curves(run_dir)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    if c["rl"]:
        draw_reward_and_kl(ax, c)
    else:
        draw_loss_and_lr(ax, c)
    ax.set_title(run_name(run_dir))
    fig.tight_layout()
    path = path or os.path.join(run_dir, "loss.png")
    fig.savefig(path)
    plt.close(fig)
    return path


def draw_reward_and_kl(ax, c):
    """PPO and GRPO: the mean reward of each step's replies, and their KL to the reference (the
    price of the reward: a reward that rises while the KL runs away is the reward model fooled)."""
    x, reward = [t for t, _ in c["reward"]], [v for _, v in c["reward"]]
    ax.plot(x, reward, lw=0.6, color="tab:green", alpha=0.35, label="reward")
    ax.plot(x, smooth(reward), lw=1.2, color="tab:green", label="reward (smoothed)")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("mean reward per reply")
    ax.grid(True, alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot([t for t, _ in c["kl"]], smooth([v for _, v in c["kl"]]), color="tab:red", lw=1.0,
             label="KL to the reference (smoothed)")
    ax2.set_ylabel("KL (nats per reply)")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="lower right")


def draw_loss_and_lr(ax, c):
    """SFT, reward model, DPO: the training loss, raw and smoothed, validation loss, and the
    learning rate on a second axis."""
    x, train = [t for t, _ in c["train"]], [v for _, v in c["train"]]
    ax.plot(x, train, lw=0.6, color="tab:blue", alpha=0.35, label="train loss")
    ax.plot(x, smooth(train), lw=1.2, color="tab:blue", label="train loss (smoothed)")
    ax.plot([t for t, _ in c["val"]], [v for _, v in c["val"]], "o-", color="tab:orange", label="validation loss")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats per pair)" if c["pairs"] else "loss (nats per supervised token)")
    ax.set_yscale("log")  # SFT losses fall by orders of magnitude; a linear axis hides the second half
    ax.grid(True, which="both", alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot([t for t, _ in c["lr"]], [v for _, v in c["lr"]], color="tab:gray", lw=0.8, ls="--",
             label="learning rate")
    ax2.set_ylabel("learning rate")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right")


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m nanosft.plot", description="draw a run's loss.png")
    p.add_argument("run", nargs="?", default="runs/latest")
    args = p.parse_args()
    try:
        print(f"wrote {plot_run(args.run)}")
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
