"""
Files that must never be seen half-written, and JSON files whose errors name the file.

    with atomic_write(path, "wb") as f: ...     a reader sees the old file or the whole new one
    write_json(path, obj) / read_json(path)     (UTF-8, indented; errors say file and line)

A run can be killed at any moment (Ctrl-C, SIGKILL, a preempted node): the weights, the token
cache, a checkpoint's `latest` and the monitor logs are all written through atomic_write, so the
next run finds either what was there before or the complete new file.
"""

import contextlib
import json
import os


@contextlib.contextmanager
def atomic_write(path, mode="w", shared=False):
    """Open `path` for writing ("w": UTF-8 text, "wb": bytes). The data goes to a temporary file
    beside it, which is flushed to disk and then renamed over `path` (a rename within a folder is
    atomic); if the block raises, the temporary file is removed and `path` is untouched. A process
    killed meanwhile leaves path.tmp, which the next write of `path` replaces. shared: other
    processes may write `path` at the same moment (runs sharing a cache): each gets its own
    temporary file, path.<pid>.tmp."""
    tmp = f"{path}.{os.getpid()}.tmp" if shared else f"{path}.tmp"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def read_json(path):
    """What a JSON file holds; a ValueError naming the file and where, when it is not JSON or not UTF-8."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return json.loads(data.decode("utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
