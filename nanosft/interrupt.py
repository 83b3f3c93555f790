"""
Ctrl-C or SIGTERM during training: the step in progress finishes, a checkpoint is saved with the
model so far, and the run exits with 128 + the signal's number and the command that resumes it,
never a traceback. A job scheduler's SIGTERM (preemption, a time limit) is treated the same way.

    stop = StopRequest()     from here on SIGINT/SIGTERM only set stop.signum
    ... after each step the ranks agree (train.py sums the flags): all stop after the same step,
    save the checkpoint --resume continues from, and call save_and_exit ...

A second Ctrl-C quits at once without saving (the last checkpoint stays complete: `latest` only
ever names a finished one). Before training starts there is nothing to save, and Ctrl-C is a plain
KeyboardInterrupt that train.py turns into one line.
"""

import signal
import sys

import torch

from nanosft.adapter import save_adapter
from nanosft.checkpoint import save_model
from nanosft.distributed import full_state_dict, is_rank0, print0
from nanosft.reward import RewardModel


class StopRequest:
    def __init__(self):
        self.signum = None  # the first signal received
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: quit now
        if self.signum is None:  # (under the launcher a rank gets the terminal's SIGINT and the launcher's SIGTERM)
            self.signum = signum
            print0(f"\n{signal.Signals(signum).name}: stopping after this step to save a checkpoint"
                   + (" (Ctrl-C again: quit without saving)" if signum == signal.SIGINT else ""), file=sys.stderr)


def save_and_exit(engine, run_dir, cfg, tok, step, signum, world):
    """After the checkpoint of `step` is saved: the model so far in run_dir (chat.py talks to it),
    the command that continues the run, and the exit. Every rank calls it (gathering is collective)."""
    state, adapters = full_state_dict(engine)
    if is_rank0():
        save_model(run_dir, state, cfg, tok)
        if adapters and not isinstance(engine.module, RewardModel):  # (a reward model's is saved merged only)
            save_adapter(run_dir, adapters, engine.module)
    again = "python train.py" if world == 1 else f"train.py under the launcher with {world} ranks again:"
    print0(f"stopped by {signal.Signals(signum).name} after step {step}: checkpoint and model saved in {run_dir}\n"
           f"continue with: {again} --out {run_dir} --resume", file=sys.stderr)
    torch.distributed.barrier()  # every rank done before any exits (the launcher stops the rest when one does)
    raise SystemExit(128 + signum)
