"""quantize.py promises: int8 rounds each weight to within half its row's scale; int4 is llama.cpp's
q4_0, equal to a plain NumPy re-implementation written here block by block, its nibbles in q4_0's
order; a quantized layer computes F.linear with the dequantized matrix, with torch's int8 kernel
and without; a quantized model keeps its logits close and its greedy replies; saved and loaded
back, it gives the very same logits; what cannot be quantized (or trained, quantized) is refused in
one line."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import run_train

import nanosft.quantize as Q
from nanosft.checkpoint import load_model, save_model
from nanosft.cli import quantize_main
from nanosft.evaluate import main as evaluate_main
from nanosft.generate import generate
from nanosft.lora import add_lora, merge_lora
from nanosft.model import ModelConfig, Transformer
from nanosft.safetensors import load_file
from nanosft.tokenizer import Tokenizer

METHODS = ("int8", "int4")


def tiny_model(seed=0, tie=True, dim=64):
    """A random model whose logits have clear winners (block weights scaled up: sharp attention)."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=300, dim=dim, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=64,
                                    tie_embeddings=tie))
    with torch.no_grad():
        for p in model.layers.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
        model.embed_tokens.weight.mul_(5.0)
    return model.eval()


def quantized_copy(model, method):
    q = Transformer(model.cfg)
    q.load_state_dict(model.state_dict())
    return Q.quantize_model(q.eval(), method)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["the number 12 is even", "what is my name? Ada.", "repeat after me"] * 20, vocab_size=300)


# -----------------------------------------------------------------------------
# the formats

def test_int8_round_trip_is_within_half_a_scale_of_every_weight():
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different sizes
    w[5] = 0  # an all-zero row
    q, scales = Q.quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (64,)
    assert q.abs().max() <= 127 and (q.abs().amax(1)[w.abs().amax(1) > 0] == 127).all()  # the row's max uses the range
    err = (Q.dequantize_int8(q, scales) - w).abs()
    assert (err <= scales[:, None] / 2 * (1 + 1e-6)).all()
    assert (Q.dequantize_int8(q, scales)[5] == 0).all()


def q4_0_reference(w):
    """llama.cpp's quantize_row_q4_0 as the issue states it, one block of 32 at a time, in NumPy:
    -> (q (N, K) values 0..15, d (N, K/32) float32)."""
    w = w.astype(np.float32)
    N, K = w.shape
    q, d = np.zeros((N, K), np.uint8), np.zeros((N, K // 32), np.float32)
    for n in range(N):
        for b in range(K // 32):
            x = w[n, 32 * b:32 * b + 32]
            m = x[np.argmax(np.abs(x))]  # the value of largest magnitude, with its sign
            d[n, b] = m / np.float32(-8)
            scaled = x / d[n, b] if d[n, b] != 0 else np.zeros_like(x)
            q[n, 32 * b:32 * b + 32] = np.clip(np.round(scaled) + 8, 0, 15)
    return q, d


def test_q4_0_equals_a_block_by_block_numpy_reference():
    torch.manual_seed(1)
    w = torch.randn(12, 128) * torch.logspace(-2, 1, 12)[:, None]
    w[3, 32:64] = 0  # an all-zero block
    w[4, :32] = torch.linspace(-1, 1, 32)  # -1 is the largest magnitude, +1 its opposite (clamped to +7)
    packed, scales = Q.quantize_q4_0(w)
    q_ref, d_ref = q4_0_reference(w.numpy())
    assert packed.dtype == torch.uint8 and packed.shape == (12, 64) and scales.shape == (12, 4)
    assert np.array_equal(scales.numpy(), d_ref)
    q = Q.unpack_nibbles(packed.reshape(12, 4, 16)).reshape(12, 128)
    assert np.array_equal(q.numpy(), q_ref)
    deq_ref = (q_ref.astype(np.float32) - 8) * np.repeat(d_ref, 32, axis=1)
    assert np.array_equal(Q.dequantize_q4_0(packed, scales).numpy(), deq_ref)
    assert q_ref[4, 0] == 0 and q_ref[4, 31] == 15  # -m lands on -8 exactly, +m is clamped to +7


def test_nibbles_are_packed_in_q4_0_block_order():
    # a block's byte j holds value j in its low four bits and value j + 16 in its high four
    q = torch.tensor([j % 16 for j in range(16)] + [15 - j for j in range(16)], dtype=torch.uint8)
    packed = Q.pack_nibbles(q)
    assert packed.tolist() == [j | ((15 - j) << 4) for j in range(16)]
    assert torch.equal(Q.unpack_nibbles(packed), q)
    # and so the first bytes of a quantized row: values 0 and 16 of its first block in byte 0
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 16] = -8.0, 3.0  # d = 1: q = 0 and 11
    packed, _ = Q.quantize_q4_0(w)
    assert packed[0, 0] == 0 | (11 << 4) and packed[0, 1] == 8 | (8 << 4)


# -----------------------------------------------------------------------------
# the layers

@pytest.mark.parametrize("method", METHODS)
def test_quant_linear_computes_f_linear_of_the_dequantized_weight(method):
    torch.manual_seed(2)
    lin = nn.Linear(96, 40, bias=True)
    layer = Q.QuantLinear(lin, method)
    for shape in ((3, 5, 96), (1, 1, 96), (7, 96)):
        x = torch.randn(shape)
        ref = F.linear(x, layer.dequantized(), lin.bias)
        y = layer(x)
        assert y.shape == ref.shape
        # int8 on CPU: torch's kernel, bf16 input and scales (2^-9 relative each); int4 in fp32
        tol = 1e-2 if method == "int8" else 1e-5
        assert (y - ref).abs().max() <= tol * ref.abs().max()


def test_both_int8_products_equal_f_linear_of_the_dequantized_weight():
    torch.manual_seed(5)
    layer = Q.QuantLinear(nn.Linear(128, 48, bias=False), "int8")
    x = torch.randn(4, 6, 128)
    ref = F.linear(x, layer.dequantized())
    converted = Q.int8_converted(x, layer.qweight, layer.scales)  # other devices (and a float16 model)
    kernel = Q.int8_kernel(x, layer.qweight, layer.kernel_scales)  # torch's, on CPU
    torch.testing.assert_close(converted, ref, rtol=1e-5, atol=1e-5)
    assert (kernel - ref).abs().max() <= 1e-2 * ref.abs().max()
    assert kernel.dtype == converted.dtype == torch.float32


def int8_kernel_calls(model, x):
    """How many times torch's weight-only int8 kernel ran in model(x), as torch's profiler saw it."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(x)
    return sum(e.name == "aten::_weight_int8pack_mm" for e in prof.events())


def test_int8_layers_run_torchs_kernel_on_cpu_and_rows_do_not_depend_on_their_batch():
    q = quantized_copy(tiny_model(), "int8")
    x = torch.randint(0, 300, (6, 10))
    with torch.no_grad():
        assert int8_kernel_calls(q, x) == 2 * 4 + 1  # every int8 matrix of the 2 blocks, and the head
        together = q(x)
        for i in range(6):  # a row's logits are those it gets alone, bit for bit (as a batch of one)
            assert torch.equal(q(x[i:i + 1])[0], together[i])
    assert int8_kernel_calls(q.to(torch.float16), x) == 0  # float16 scales: the integers converted


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("tie", [True, False])
def test_quantize_model_replaces_every_matrix_and_keeps_logits_close(method, tie):
    model = tiny_model(tie=tie)
    q = quantized_copy(model, method)
    assert not any(isinstance(m, (nn.Linear, nn.Embedding)) for m in q.modules())
    assert isinstance(q.embed_tokens, Q.QuantEmbedding) and isinstance(q.lm_head, Q.QuantLMHead)
    assert (q.embed_tokens.qweight is q.lm_head.qweight) == tie  # a tied matrix stays one
    assert Q.quantization(q) == {"method": method, "bits": int(method[3:]), "group_size": 32 if method == "int4" else None}
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        ref, out = model(x), q(x)
    # (a random model with sharp attention: 2% of the largest logit for int8, 25-30% for int4 measured)
    err = (out - ref).abs().max() / ref.abs().max()
    assert err < {"int8": 0.05, "int4": 0.4}[method]
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree >= {"int8": 0.9, "int4": 0.5}[method]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("tie", [True, False])
def test_a_quantized_model_computes_the_float_model_of_its_dequantized_matrices(method, tie):
    q = quantized_copy(tiny_model(tie=tie), method).double()  # float64: int8 converts, as the reference does
    ref = tiny_model(tie=tie).double()  # the same shapes; every matrix replaced by a dequantized one
    with torch.no_grad():
        for name, m in q.named_modules():
            if isinstance(m, (Q.QuantLinear, Q.QuantEmbedding)):
                ref.get_submodule(name).weight.copy_(Q.DEQUANTIZE[method](m.qweight, m.scales))
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(q(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def trained():
    """A small model trained here for a second on a rule with one answer a step (next = 3 prev + 1
    mod 300): greedy replies that mean something, as a trained chat model's do."""
    torch.manual_seed(4)
    model = Transformer(ModelConfig(vocab_size=300, dim=64, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        seq = [torch.randint(0, 300, (16,))]
        for _ in range(24):
            seq.append((3 * seq[-1] + 1) % 300)
        x = torch.stack(seq, 1)  # (16, 25)
        loss, n = model(x[:, :-1], targets=x[:, 1:])
        opt.zero_grad()
        (loss / n).backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("method", METHODS)
def test_greedy_replies_of_a_quantized_small_model_stay_the_same(method, trained):
    q = quantized_copy(trained, method)
    prompts = [[s, (3 * s + 1) % 300] for s in range(0, 300, 15)]
    same = sum(list(generate(trained, p, 16)) == list(generate(q, p, 16)) for p in prompts)
    assert same >= 0.9 * len(prompts)


def test_the_quantized_head_gives_the_same_loss_fused_or_from_the_logits():
    q = quantized_copy(tiny_model(), "int4")
    x, t = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        q.fused_loss = True
        fused = q(x, targets=t)
        q.fused_loss = False
        plain = q(x, targets=t)
    assert fused[1] == plain[1] and torch.allclose(fused[0], plain[0], rtol=1e-5)


def test_a_quantized_model_follows_dtype_and_keeps_its_tied_matrix_one():
    q = quantized_copy(tiny_model(), "int8").to(torch.bfloat16)
    assert q.embed_tokens.qweight is q.lm_head.qweight and q.lm_head.qweight.dtype == torch.int8
    assert q.embed_tokens.scales is q.lm_head.scales and q.lm_head.scales.dtype == torch.bfloat16  # converted once
    assert q.embed_tokens.weight.dtype == torch.bfloat16  # what new_cache and generate read
    assert q(torch.randint(0, 300, (1, 8))).dtype == torch.bfloat16
    assert len(list(generate(q, [1, 2, 3], 4))) == 4


def test_lora_adapters_are_merged_before_quantizing():
    model = tiny_model()
    add_lora(model, ["all"], rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    merged = merge_lora(copy.deepcopy(model))
    x = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(Q.quantize_model(model, "int8")(x), Q.quantize_model(merged, "int8")(x))


# -----------------------------------------------------------------------------
# on disk, and refusals

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("tie", [True, False])
def test_a_saved_quantized_model_loads_back_with_identical_logits(method, tie, tok, tmp_path):
    q = quantized_copy(tiny_model(tie=tie), method)
    save_model(tmp_path, q.state_dict(), q.cfg, tok, Q.quantization(q))
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["quantization"] == Q.quantization(q) and hf["torch_dtype"] == "float32"
    assert (tmp_path / "tokenizer.model").exists() and (tmp_path / "tokenizer_config.json").exists()
    tensors = load_file(tmp_path / "model.safetensors")
    qweight = tensors["model.layers.0.self_attn.k_proj.qweight"]  # Llama's names, q/k/v apart
    assert qweight.dtype == (torch.int8 if method == "int8" else torch.uint8)
    assert qweight.shape == (2 * 16, 64 if method == "int8" else 32)
    assert ("lm_head.qweight" in tensors) == (not tie)
    loaded, _ = load_model(tmp_path)
    assert Q.quantization(loaded) == Q.quantization(q)
    assert (loaded.embed_tokens.qweight is loaded.lm_head.qweight) == tie
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


def test_the_command_line_writes_a_directory_that_loads_back(tok, tmp_path, capsys):
    model = tiny_model()
    save_model(tmp_path / "run", model.state_dict(), model.cfg, tok)
    quantize_main(["--ckpt", str(tmp_path / "run"), "--method", "int4", "--out", str(tmp_path / "q")])
    assert "x smaller" in capsys.readouterr().out
    loaded, _ = load_model(tmp_path / "q")
    x = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(x), quantized_copy(model, "int4")(x))


def refusal(argv, main=quantize_main):
    """The message a command exits with: one line, no traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_unknown_methods_quantized_directories_and_missing_checkpoints_are_refused(tok, tmp_path):
    model = tiny_model()
    save_model(tmp_path / "run", model.state_dict(), model.cfg, tok)
    q = quantized_copy(model, "int8")
    save_model(tmp_path / "q", q.state_dict(), q.cfg, tok, Q.quantization(q))
    assert "unknown quantization method 'int3'" in refusal(["--ckpt", str(tmp_path / "run"), "--method", "int3",
                                                            "--out", str(tmp_path / "x")])
    assert "already quantized (int8)" in refusal(["--ckpt", str(tmp_path / "q"), "--method", "int4",
                                                  "--out", str(tmp_path / "x")])
    assert "config.json not found" in refusal(["--ckpt", str(tmp_path / "none"), "--method", "int8", "--out", str(tmp_path / "x")])
    assert "is --ckpt itself" in refusal(["--ckpt", str(tmp_path / "run"), "--method", "int8",
                                          "--out", str(tmp_path / "run")])
    assert not (tmp_path / "x").exists()
    eval_data = tmp_path / "eval.jsonl"
    eval_data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "answer": "12"}) + "\n")
    assert "already quantized" in refusal(["--ckpt", str(tmp_path / "q"), "--data", str(eval_data), "--quantize",
                                           "int8", "--threads", "1"], evaluate_main)
    with pytest.raises(ValueError, match="unknown quantization method"):
        Q.quantize_model(tiny_model(), "fp8")


def test_int4_refuses_a_width_that_does_not_split_into_groups_before_changing_anything():
    model = tiny_model(dim=48)  # 48 inputs: one group and a half
    with pytest.raises(ValueError, match="groups of 32"):
        Q.quantize_model(model, "int4")
    assert Q.quantization(model) is None and isinstance(model.lm_head, nn.Linear)


def test_evaluate_quantize_evaluates_the_quantized_model(tok, tmp_path, capsys):
    model = tiny_model()
    save_model(tmp_path / "run", model.state_dict(), model.cfg, tok)
    eval_data = tmp_path / "eval.jsonl"
    eval_data.write_text(json.dumps({"messages": [{"role": "user", "content": "the number"}], "answer": "12"}) + "\n")
    evaluate_main(["--ckpt", str(tmp_path / "run"), "--data", str(eval_data), "--quantize", "int4", "--threads", "1"])
    assert "quantized int4 on 1 held-out prompts" in capsys.readouterr().out


def test_training_refuses_to_start_from_a_quantized_model(tok, tmp_path):
    q = quantized_copy(tiny_model(), "int4")
    save_model(tmp_path / "q", q.state_dict(), q.cfg, tok, Q.quantization(q))
    r = run_train("--init-from", str(tmp_path / "q"), "--steps", "1", "--out", str(tmp_path / "run"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "is quantized (int4); train from the model it came from" in r.stdout + r.stderr
