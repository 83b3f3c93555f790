"""
The training loop's status line: step, loss, tokens/s and time left.

On a terminal it is a live progress bar, redrawn in place (at most 10 times a second):

    step  412/1230 [#######.............]  loss 0.4121  lr 2.71e-03  17,912 tok/s  1:52 left

Otherwise (a log file, a pipe, CI, or --quiet) it prints one plain line every `every` steps and at
the last step, so a log holds a readable history instead of thousands of carriage returns:

    step 400/1230  loss 0.4133  lr 2.74e-03  17,906 tok/s  1:55 left  110s

`note()` prints a line (an evaluation result, say) above the bar without tearing it. train.py
makes one on rank 0; the other ranks print nothing.
"""

import sys
import time


def clock(seconds):
    """1234.5 -> '20:34'; 4000 -> '1:06:40'."""
    s = int(seconds)
    h, m = s // 3600, s // 60 % 60
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


class Progress:
    def __init__(self, total, every=25, live=None, stream=None, width=20):
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.total, self.every, self.width = total, every, width
        self.line, self.last_draw = "", 0.0

    def update(self, step, loss, lr, tok_per_s, elapsed, left):
        """After optimizer step `step`; `left` is the estimated time to the end, in seconds."""
        stats = f"loss {loss:.4f}  lr {lr:.2e}  {tok_per_s:,.0f} tok/s  {clock(left)} left"
        if self.live:
            done = int(self.width * step / self.total)
            self.line = (f"step {step:>{len(str(self.total))}}/{self.total} "
                         f"[{'#' * done}{'.' * (self.width - done)}]  {stats}")
            now = time.monotonic()
            if now - self.last_draw >= 0.1 or step == self.total:  # redrawing costs; the eye cannot tell
                self._draw()
                self.last_draw = now
        elif step % self.every == 0 or step == self.total:
            self.stream.write(f"step {step}/{self.total}  {stats}  {elapsed:.0f}s\n")
            self.stream.flush()

    def note(self, text):
        """Print a whole line; on a terminal the bar is redrawn below it."""
        if self.live and self.line:
            self.stream.write("\r\033[K")  # carriage return, clear to the end of the line
        self.stream.write(text + "\n")
        if self.live and self.line:
            self._draw()
        self.stream.flush()

    def close(self):
        if self.live and self.line:
            self.stream.write("\n")
            self.stream.flush()
        self.line = ""

    def _draw(self):
        self.stream.write("\r\033[K" + self.line)
        self.stream.flush()
