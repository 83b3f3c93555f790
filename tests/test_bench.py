"""The benchmark scripts promise figures, not speed: each runs end to end on a tiny budget, passes
its own cross-checks (the same starting loss for nanosft and transformers, the same greedy ids; a
script exits non-zero when they fail) and writes the JSON fields the README tables come from.
Timings themselves are never asserted: they are measured by hand with the scripts in bench/."""

import json
import math
import os
import sys

import pytest
from conftest import ROOT, run

pytestmark = pytest.mark.slow


def bench(tmp_path, script, *args):
    out = tmp_path / f"{script}.json"
    r = run([sys.executable, os.path.join(ROOT, "bench", f"{script}.py"), *args, "--json", str(out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text())


def test_train_step_reports_both_models_and_the_mfu_of_each_dtype(tmp_path):
    d = bench(tmp_path, "train_step", "--configs", "tiny", "--dtypes", "fp32,bf16", "--rounds", "1",
              "--steps", "1", "--batch", "2", "--seq", "32", "--no-compile", "--peak-seconds", "0.05",
              "--peak-sizes", "512")
    assert set(d["matmul_peak_flops"]) == {"fp32", "bf16"}
    assert [(r["config"], r["dtype"]) for r in d["results"]] == [("tiny", "fp32"), ("tiny", "bf16")]
    for r in d["results"]:
        assert r["nanosft_tokens_per_s"] > 0 and r["hf_tokens_per_s"] > 0 and "ratio" in r
        assert 0 < r["mfu"] < 1 and 0 < r["hf_mfu"] < 1
        assert r["initial_loss"] == pytest.approx(math.log(2048), abs=0.1)  # untrained: about uniform


def test_padding_packs_tighter_and_takes_fewer_steps_than_padded_batches(tmp_path):
    d = bench(tmp_path, "padding", "--data", "longtail", "--conversations", "24", "--longtail-max", "300",
              "--rounds", "1")
    r, = d["results"]
    assert r["conversations"] == 24 and r["max_len"] <= 301
    assert r["packed_padding_fraction"] < r["padded_padding_fraction"]
    assert r["packed_steps"] <= r["padded_steps"]
    assert {"nanosft_packed_tokens_per_s", "nanosft_padded_tokens_per_s", "hf_padded_tokens_per_s", "ratio"} <= set(r)


def test_generate_reports_every_prompt_length_against_recompute_and_transformers(tmp_path):
    d = bench(tmp_path, "generate", "--prompt-tokens", "4,40", "--new-tokens", "12", "--repeats", "1")
    assert [r["prompt_tokens"] for r in d["runs"]] == [4, 40]
    for r in d["runs"]:
        assert {"speedup_vs_recompute", "speedup_vs_hf_generate"} <= set(r)
        assert all(r[k]["identical_ids"] for k in ("kv_cache", "recompute", "hf_generate"))
