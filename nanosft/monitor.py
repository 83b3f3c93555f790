"""
The run's logs, written through DeepSpeed's own monitor: one CSV file per quantity in
runs/<name>/monitor/ (and with --tensorboard the same events for TensorBoard in runs/<name>/tensorboard/).

    log_events(engine, step, "Train", loss=..., lr=...)   -> monitor/Train_loss.csv, Train_lr.csv, ...
    read_monitor(run_dir)                                  -> {"Train_loss": {step: value}, ...}
    trim_monitor(engine, run_dir, upto, samples_per_step)  a resumed run cuts both logs back to its checkpoint

Each CSV is a "step,<name>" header and then a row per logged step. A resumed run recomputes the
steps after its checkpoint, so it first cuts every log back to the checkpoint's step: every step
then shows once. plot.py draws the CSVs; deepspeed_config (distributed.py) turns the monitor on.
"""

import csv
import io
import math
import os

from nanosft.distributed import is_rank0
from nanosft.files import atomic_write

MONITOR_DIR = "monitor"  # under the run directory: the csv_monitor's job_name (distributed.py)


def log_events(engine, step, group, **values):
    """Write values through DeepSpeed's monitor (rank 0): CSV, and TensorBoard with --tensorboard."""
    if is_rank0():
        engine.monitor.write_events([(f"{group}/{k}", v, step) for k, v in values.items() if v is not None])


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


def trim_monitor(engine, run_dir, upto, samples_per_step):
    """A resumed run recomputes the steps after its checkpoint: cut the monitor's CSVs (and
    TensorBoard's events) back to steps 0..upto (DeepSpeed's own Train/Samples series count
    samples, not steps). Each CSV is replaced atomically, so a kill now cannot lose the rows kept."""
    if not is_rank0():  # the monitor writes on rank 0 only
        return
    def limit(name):  # "Train_Samples_lr" in the CSVs, "Train/Samples/lr" in TensorBoard
        return upto * samples_per_step if name.replace("/", "_").startswith("Train_Samples_") else upto
    folder = os.path.join(run_dir, MONITOR_DIR)
    names = [n for n in os.listdir(folder) if n.endswith(".csv")] if os.path.isdir(folder) else []
    for name in names:
        with open(os.path.join(folder, name), newline="") as f:
            rows = list(csv.reader(f))
        text = io.StringIO()
        csv.writer(text).writerows(rows[:1] + [r for r in rows[1:] if len(r) == 2 and row_step(r) <= limit(name)])
        with atomic_write(os.path.join(folder, name)) as f:
            f.write(text.getvalue())
    # NOTE: DeepSpeed's csv monitor writes a header the first time a process writes to a file, and
    # remembers which in `filenames`; these files have theirs already
    if engine.monitor.csv_monitor is not None:
        engine.monitor.csv_monitor.filenames += [n[:-4] for n in names]
    tb = engine.monitor.tb_monitor  # (a TensorBoard section of --ds-config may log elsewhere: not ours to cut)
    if tb is not None and tb.summary_writer is not None and \
            os.path.abspath(tb.summary_writer.get_logdir()) == os.path.abspath(os.path.join(run_dir, "tensorboard")):
        tb.summary_writer = trim_tensorboard(tb.summary_writer, limit)


def trim_tensorboard(writer, limit):
    """TensorBoard's event files cannot be cut in place: copy the events to keep (step <= limit(tag))
    into a new writer's file, then delete the old files. A kill in between leaves the kept events in
    two files, never in none; the next resume copies each (tag, step) once. -> the new writer."""
    # (as written: the plain loader would turn the scalars into tensors on the way)
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader  # with --tensorboard
    from torch.utils.tensorboard import SummaryWriter
    folder = writer.get_logdir()
    writer.close()
    old = [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.startswith("events.out.tfevents.")]
    writer, copied = SummaryWriter(log_dir=folder), set()
    for path in old:
        for event in LegacyEventFileLoader(path).Load():
            values = event.summary.value  # one scalar per event, as the monitor writes them
            if values and event.step <= limit(values[0].tag) and (values[0].tag, event.step) not in copied:
                copied.add((values[0].tag, event.step))
                writer.file_writer.add_event(event, step=event.step, walltime=event.wall_time)
    writer.flush()
    for name in os.listdir(folder):  # the new file on disk before the old ones go
        if os.path.join(folder, name) not in old:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
    for path in old:
        os.remove(path)
    return writer


def row_step(row):
    """The step (or sample count) of a monitor CSV row; a row cut short by a kill counts as past the end."""
    try:
        return float(row[0])
    except ValueError:
        return math.inf
