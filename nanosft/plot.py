"""
Pictures of a run: runs/<name>/loss.png, training and validation loss against tokens seen, with
the learning rate on a second axis.

    python -m nanosft.plot runs/latest        # or: make plot RUN=runs/latest

The numbers come from the run's DeepSpeed monitor CSVs (train.py logs through DeepSpeed's own
monitor): runs/<name>/monitor/<Group>_<name>.csv, one file per quantity, each a "step,<name>"
header and then a row per logged step, e.g. Train_loss.csv, Train_tokens.csv, Train_lr.csv,
Eval_val_loss.csv. `read_monitor` reads them back for anyone else too (tests, notebooks).
train.py draws the plot at the end of a run.
"""

import argparse
import csv
import io
import math
import os
import sys

MONITOR_DIR = "monitor"  # under the run directory: DeepSpeed's csv_monitor job_name


def read_monitor(run_dir):
    """-> {"Train_loss": {step: value, ...}, ...}: every CSV the monitor wrote, by file name. (The
    monitor names a file for its event with "/" made "_": Train/loss -> Train_loss.csv.)"""
    folder = os.path.join(run_dir, MONITOR_DIR)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} not found: not a run written by train.py")
    series = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".csv"):
            path = os.path.join(folder, name)
            with open(path, newline="") as f:
                text = f.read()
            rows = list(csv.reader(io.StringIO(text)))[1:]  # the header is "step,<name>"
            if not text.endswith("\n"):
                rows = rows[:-1]  # a last row cut short by a kill (even where it still parses): the run stopped before it
            series[name[:-4]] = points = {}
            for line, r in enumerate(rows, 2):
                try:
                    points[int(float(r[0]))] = float(r[1])
                except (ValueError, IndexError):
                    raise ValueError(f"{path}:{line}: not a 'step,value' row: {','.join(r)!r}") from None
    return series


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
    """-> {"train": [(tokens seen, loss), ...], "val": [...], "lr": [...]}: the run's curves against
    the tokens seen at each logged step."""
    s = read_monitor(run_dir)
    tokens = {0: 0.0, **s.get("Train_tokens", {})}  # step -> tokens seen after it
    picked = {"train": "Train_loss", "val": "Eval_val_loss", "lr": "Train_lr"}
    return {k: [(tokens[st], v) for st, v in sorted(s.get(name, {}).items()) if st in tokens]
            for k, name in picked.items()}


def plot_run(run_dir, path=None):
    """Draw loss.png from the run's monitor CSVs; returns its path."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    c = curves(run_dir)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    x, train = [t for t, _ in c["train"]], [v for _, v in c["train"]]
    ax.plot(x, train, lw=0.6, color="tab:blue", alpha=0.35, label="train loss")
    ax.plot(x, smooth(train), lw=1.2, color="tab:blue", label="train loss (smoothed)")
    ax.plot([t for t, _ in c["val"]], [v for _, v in c["val"]], "o-", color="tab:orange", label="validation loss")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats per supervised token)")
    ax.set_yscale("log")  # SFT losses fall by orders of magnitude; a linear axis hides the second half
    ax.grid(True, which="both", alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot([t for t, _ in c["lr"]], [v for _, v in c["lr"]], color="tab:gray", lw=0.8, ls="--",
             label="learning rate")
    ax2.set_ylabel("learning rate")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right")
    ax.set_title(os.path.basename(os.path.normpath(run_dir)))
    fig.tight_layout()
    path = path or os.path.join(run_dir, "loss.png")
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m nanosft.plot", description="draw a run's loss.png")
    p.add_argument("run", nargs="?", default="runs/latest")
    args = p.parse_args()
    try:
        print(f"wrote {plot_run(args.run)}")
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
