"""files.py promises: a file written through atomic_write is either its old self or the whole new
content, never half of it, with no temporary file left behind; read_json names the file and the
line of what is wrong."""

import json

import pytest

from nanosft.files import atomic_write, read_json, write_json


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "latest"
    path.write_text("step00000010")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path) as f:
            f.write("step000")
            raise KeyboardInterrupt  # Ctrl-C halfway through
    assert path.read_text() == "step00000010"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]
    with atomic_write(path) as f:
        f.write("step00000020")
    assert path.read_text() == "step00000020" and sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_shared_writers_each_write_their_own_temporary(tmp_path):
    path = tmp_path / "tokenizer.model"
    with atomic_write(path, "wb", shared=True) as f:
        assert f.name.endswith(".tmp") and f.name != str(path) + ".tmp"  # path.<pid>.tmp
        f.write(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01" and len(list(tmp_path.iterdir())) == 1


def test_json_round_trips_unicode_and_a_bad_file_is_named_with_its_line(tmp_path):
    path = tmp_path / "args.json"
    write_json(path, {"data": ["你好.jsonl"], "lr": 0.003})
    assert read_json(path) == {"data": ["你好.jsonl"], "lr": 0.003} and "你好" in path.read_text(encoding="utf-8")
    path.write_text('{\n  "lr": 0.003,\n  "seed": ,\n  "out": "runs/x"\n}')
    with pytest.raises(ValueError, match=rf"{path}: invalid JSON \(Expecting value at line 3\)"):
        read_json(path)
    path.write_bytes(json.dumps({"a": "x"}).encode()[:-3] + b"\xff\"}")
    with pytest.raises(ValueError, match=rf"{path}: invalid UTF-8"):
        read_json(path)
