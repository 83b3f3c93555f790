"""compare.py and docs/attention.md promise: following the doc's three steps literally (appending
its code blocks to the two files they name, nanosft/attention.py and tests/test_attention.py, and
touching nothing else) adds a variant that passes its tests and trains in `python -m nanosft.compare`
next to a built-in one; compare.json holds each run's own figures and curves, compare.png is drawn,
and an unknown variant is refused by name."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import DIST_VARS, ROOT, TINY

pytestmark = pytest.mark.slow


def run_in(repo, *args):
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return subprocess.run([sys.executable, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def doc_example(tmp_path_factory, tiny_data):
    """A copy of the repository with the doc's code blocks appended, its new tests run, and a short
    compare of gqa against the new variant. -> (repo, blocks, pytest result, compare output dir)"""
    text = open(os.path.join(ROOT, "docs", "attention.md"), encoding="utf-8").read()
    blocks = re.findall(r"```python (\S+)\n(.*?)```", text, flags=re.S)  # (file, code)
    repo = tmp_path_factory.mktemp("doc") / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", "*.jsonl",
                                                              "cache", ".pytest_cache"))
    for path, code in blocks:
        with open(repo / path, "a", encoding="utf-8") as f:
            f.write("\n\n" + code)
    tests = run_in(repo, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_attention.py", "-k", "diff")
    out = repo / "runs" / "compare"
    seed = TINY.index("--seed")
    tiny = TINY[:seed] + TINY[seed + 2:]  # compare sets the seed itself
    r = run_in(repo, "-m", "nanosft.compare", "--variants", "gqa", "diff", "--steps", "4", "--seed", TINY[seed + 1],
               "--out", str(out), "--", "--data", str(tiny_data / "train.jsonl"), "--val-data",
               str(tiny_data / "val.jsonl"), "--eval-data", str(tiny_data / "eval.jsonl"), "--eval-every", "2", *tiny)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return repo, blocks, tests, out, r.stdout


def test_the_docs_steps_touch_only_attention_py_and_its_test_and_their_tests_pass(doc_example):
    repo, blocks, tests, _, _ = doc_example
    assert {path for path, _ in blocks} == {"nanosft/attention.py", "tests/test_attention.py"}
    assert tests.returncode == 0, tests.stdout[-3000:]
    # the new formula test, and the VARIANTS-wide ones (paths, look-ahead and KV cache) now run on diff too
    assert int(re.search(r"(\d+) passed", tests.stdout).group(1)) >= 3


def test_compare_trains_every_variant_and_reports_each_runs_own_figures(doc_example):
    repo, _, _, out, stdout = doc_example
    report = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    assert list(report["variants"]) == ["gqa", "diff"]
    for name, r in report["variants"].items():
        metrics = json.loads((out / name / "metrics.json").read_text(encoding="utf-8"))
        assert (r["params"], r["val_loss"], r["exact_match"]) == \
            (metrics["params"], metrics["val_loss"], metrics["exact_match"])
        assert r["tokens_per_s"] == metrics["train_tokens_per_s"] and r["steps"] == 4
        assert [len(r["curves"]["train"]), len(r["curves"]["val"])] == [4, 3]  # every step; steps 0, 2, 4
        assert r["curves"]["val"][-1][1] == pytest.approx(r["val_loss"], rel=1e-6)
    assert report["variants"]["diff"]["config"] == {"attn_impl": "diff"}
    saved = json.loads((out / "diff" / "config.json").read_text(encoding="utf-8"))
    assert (saved["model_type"], saved["attn_impl"]) == ("nanosft", "diff")  # the run knows its attention
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = stdout[stdout.index("params"):]
    assert "gqa" in stdout and "diff" in stdout and "exact match overall" in table and "tokens/s" in table


def test_an_unknown_variant_or_a_flag_compare_sets_itself_is_refused_by_name():
    r = run_in(ROOT, "-m", "nanosft.compare", "--variants", "mha", "flash9")
    assert r.returncode != 0 and "unknown variant(s) ['flash9']" in r.stderr and "mha, gqa" in r.stderr
    r = run_in(ROOT, "-m", "nanosft.compare", "--", "--lr", "1e-3", "--attn=mqa")
    assert r.returncode != 0 and "--attn after -- would differ" in r.stderr


def test_steps_and_seed_among_the_train_flags_are_compares_own():
    """`make compare ARGS="--steps 100"` puts them after --, where train.py flags go."""
    from nanosft.compare import parse_args
    args = parse_args(["--variants", "mha", "--", "--lr", "1e-3", "--steps=20", "--seed", "3"])
    assert (args.steps, args.seed, args.train_args) == (20, 3, ["--lr", "1e-3"])
    assert parse_args([]).steps == 500
