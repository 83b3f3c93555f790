"""chat.py with decoding slowed to 20 tokens/s, so that a test (or a person, or tmux capture-pane)
can watch a reply arrive piece by piece. Everything else is chat.py itself:

    python tests/slow_chat.py --ckpt runs/latest
"""

import os
import runpy
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import nanosft.generate as g  # noqa: E402

fast = g.generate


def slow(*args, **kw):
    for t in fast(*args, **kw):
        time.sleep(0.05)
        yield t


g.generate = slow  # before chat.py imports it
sys.argv = ["chat.py"] + sys.argv[1:]
runpy.run_path(os.path.join(ROOT, "chat.py"), run_name="__main__")
