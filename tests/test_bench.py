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
        # MFU as defined: achieved FLOP/s over the measured matmul peak (not bounded by 1 here: the
        # peak of a 50 ms measurement on a busy machine can come out below a step's rate)
        peak = d["matmul_peak_flops"][r["dtype"]]
        assert r["mfu"] == pytest.approx(r["nanosft_tokens_per_s"] * r["flops_per_token"] / peak) and r["mfu"] > 0
        assert r["hf_mfu"] == pytest.approx(r["hf_tokens_per_s"] * r["flops_per_token"] / peak) and r["hf_mfu"] > 0
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


def test_serve_reports_decode_rates_against_transformers_and_a_load_without_cross_talk(tmp_path, tiny_run):
    d = bench(tmp_path, "serve", "--ckpt", str(tiny_run[1]), "--eval-data", str(tiny_run[0] / "eval.jsonl"),
              "--tokens", "8", "--short", "4", "--repeats", "1")
    for side in ("server", "transformers"):  # (decode rates of 8 - 4 tokens may drown in noise: None then)
        assert set(d[side]) == {"1", "4", "16"} and all(whole > 0 for whole, _ in d[side].values())
        assert all(decode is None or decode > 0 for _, decode in d[side].values())
    assert d["whole_vs_transformers_at_16"] > 0
    load = d["load"]
    assert load["requests"] == 128 and load["all_answered"] and load["same_as_alone"] == 128
    assert 0 < load["latency_p50_s"] <= load["latency_p95_s"]


def test_gpu_check_stops_at_once_on_a_machine_without_a_gpu(tmp_path):  # (the tests' torch is the CPU wheel)
    r = run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--out", str(tmp_path / "out")])
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "gpu-check: needs a CUDA GPU" in r.stderr and "On a GPU" in r.stderr
    assert not (tmp_path / "out").exists()  # nothing started


def test_gpu_check_runs_every_check_reports_each_and_fits_the_default_model(tmp_path, monkeypatch, capsys):
    """The check's own logic, on CPU: its commands (faked) and the table and JSON it makes of them."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import gpu_check
    import torch
    from nanosft.model import ModelConfig
    monkeypatch.setattr(gpu_check, "preflight", lambda: {"gpus": ["Fake GPU"] * 2, "torch": "x", "cuda": "13",
                                                          "deepspeed": "y"})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    commands = []
    monkeypatch.setattr(gpu_check, "run", lambda cmd, timeout: commands.append(cmd) or
                        ((1.0, None) if cmd[-1].endswith("generate.py") else (2.0, "Traceback...\nRuntimeError: boom")))
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        gpu_check.main()
    assert e.value.code == 1  # some failed
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in table[1:-1]] == [["data", "ok"]] + [[n, "FAILED"] for n in
                                                         ("bf16", "fp16", "zero2", "zero3", "compile", "train_step", "decode")]
    assert all(line.endswith("RuntimeError: boom") for line in table[2:-1])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["ok"] for r in report["checks"]] == [True] + [False] * 7
    zero = [c for c in commands if "--zero-stage" in c]
    assert len(zero) == 2 and all("--num_gpus" in c and c[c.index("--num_gpus") + 1] == "2" for c in zero)
    decode = commands[-1]
    prompt = max(int(n) for n in decode[decode.index("--prompt-tokens") + 1].split(","))
    assert prompt + int(decode[decode.index("--new-tokens") + 1]) <= ModelConfig().max_seq_len  # the default run's


def test_quantize_reports_perplexity_sizes_and_speed_and_reloads_each_model_identically(tmp_path, tiny_data):
    from nanosft.checkpoint import save_model
    from nanosft.data import load_jsonl
    from nanosft.model import ModelConfig, Transformer
    from nanosft.tokenizer import Tokenizer
    records = load_jsonl(tiny_data / "train.jsonl")
    tok = Tokenizer.train([m["content"] for r in records for m in r["messages"]], 300)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layer=2, n_head=4, n_kv_head=2,
                                    max_seq_len=128))
    save_model(tmp_path / "run", model.state_dict(), model.cfg, tok)
    d = bench(tmp_path, "quantize", "--ckpt", str(tmp_path / "run"), "--val-data", str(tiny_data / "val.jsonl"),
              "--eval-data", str(tiny_data / "eval.jsonl"), "--new-tokens", "4", "--repeats", "1")
    assert [r["weights"] for r in d["results"]] == ["fp32", "int8", "int4"]
    fp32, int8, int4 = d["results"]
    assert all(r["reloads_identically"] for r in (int8, int4))
    assert 3.7 < int8["matrix_smaller"] < 4 and 6 < int4["matrix_smaller"] < 6.5  # 64 inputs a row
    assert int8["file_smaller"] > 3 and int4["file_smaller"] > 5
    for r in d["results"]:
        assert r["val_ppl"] > 1 and r["decode_tokens_per_s"] > 0 and 0 <= r["exact_match"] <= 1
