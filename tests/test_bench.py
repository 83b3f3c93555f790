"""The benchmark scripts promise figures, not speed: each runs end to end on a tiny budget, checks its
sides against each other (same starting loss, same greedy ids), and writes the JSON fields the README
tables are built from. Timings themselves are never asserted (they belong to bench/, run by hand)."""

import json
import os
import sys

import pytest
from conftest import ROOT, run

pytestmark = pytest.mark.slow


def bench(tmp_path, script, *args):
    out = tmp_path / f"{script}.json"
    r = run([sys.executable, os.path.join(ROOT, "bench", f"{script}.py"), *args, "--json", str(out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout


def test_train_step_compares_with_transformers_on_the_same_weights(tmp_path):
    d, stdout = bench(tmp_path, "train_step", "--configs", "tiny", "--dtypes", "fp32,bf16", "--rounds", "1",
                      "--steps", "1", "--batch", "2", "--seq", "32", "--no-compile", "--peak-seconds", "0.05")
    assert d["matmul_peak_flops"]["fp32"] > 0 and d["matmul_peak_flops"]["bf16"] > 0
    assert [(r["config"], r["dtype"]) for r in d["results"]] == [("tiny", "fp32"), ("tiny", "bf16")]
    for r in d["results"]:
        assert r["ratio"] == pytest.approx(r["nanosft_tokens_per_s"] / r["hf_tokens_per_s"])
        assert 0 < r["mfu"] < 1 and 0 < r["hf_mfu"] < 1
        assert r["initial_loss"] == pytest.approx(7.62, abs=0.1)  # about ln(2048): untrained
    assert "matmul peak" in stdout


def test_padding_counts_real_tokens_and_packs_tighter_than_padded_batches(tmp_path):
    d, _ = bench(tmp_path, "padding", "--data", "longtail", "--conversations", "24", "--longtail-max", "300",
                 "--rounds", "1")
    r, = d["results"]
    assert r["conversations"] == 24 and r["real_tokens"] > 0
    assert r["packed_padding_fraction"] < r["padded_padding_fraction"]
    assert r["ratio"] == pytest.approx(r["nanosft_packed_tokens_per_s"] / r["hf_padded_tokens_per_s"])


def test_generate_decodes_the_same_ids_as_recompute_and_transformers(tmp_path):
    d, _ = bench(tmp_path, "generate", "--prompt-tokens", "4,40", "--new-tokens", "12", "--repeats", "1")
    assert d["identical_ids"] is True  # the script exits 1 otherwise
    assert [r["prompt_tokens"] for r in d["runs"]] == [4, 40]
    for r in d["runs"]:
        assert set(r) >= {"kv_cache", "recompute", "hf_generate", "speedup_vs_recompute", "speedup_vs_hf_generate"}
        assert r["kv_cache"]["identical_ids"] and r["hf_generate"]["identical_ids"]
