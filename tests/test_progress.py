"""progress.py promises: on a terminal, one status line redrawn in place with the step, a bar, the
loss, tokens/s and the time left; in a log (not a terminal, or --quiet) a plain line every N steps
and at the last; notes printed between do not tear the bar."""

import io

from nanosft.progress import Progress, clock


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_a_plain_line_every_n_steps_and_at_the_end():
    out = io.StringIO()  # not a terminal
    p = Progress(total=10, every=4, stream=out)
    for step in range(1, 11):
        p.update(step, loss=1.0 / step, lr=1e-3, tok_per_s=12345.6, elapsed=step * 2.0, left=(10 - step) * 2.0)
    p.close()
    lines = out.getvalue().splitlines()
    assert [line.split("  ")[0] for line in lines] == ["step 4/10", "step 8/10", "step 10/10"]
    assert lines[0] == "step 4/10  loss 0.2500  lr 1.00e-03  12,346 tok/s  0:12 left  8s"
    assert "\r" not in out.getvalue()


def test_a_terminal_gets_one_bar_redrawn_in_place_with_notes_above_it():
    out = Terminal()
    p = Progress(total=40, every=10, stream=out, width=10)
    p.update(20, loss=0.5, lr=2e-3, tok_per_s=1000, elapsed=10, left=3725)
    p.note("step 20: val loss 0.4")
    p.update(40, loss=0.25, lr=1e-3, tok_per_s=1000, elapsed=20, left=0)
    p.close()
    text = out.getvalue()
    assert "step 20/40 [#####.....]  loss 0.5000  lr 2.00e-03  1,000 tok/s  1:02:05 left" in text
    assert "\r\033[Kstep 20: val loss 0.4\n\r\033[Kstep 20/40" in text  # the note, then the bar again
    assert text.endswith("step 40/40 [##########]  loss 0.2500  lr 1.00e-03  1,000 tok/s  0:00 left\n")
    assert text.count("\n") == 2  # the note and the final line break: the bar itself never scrolls


def test_clock():
    assert (clock(0), clock(59.9), clock(61), clock(3600), clock(4000)) == ("0:00", "0:59", "1:01", "1:00:00", "1:06:40")
