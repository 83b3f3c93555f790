"""train.py's optimizers promise: with --optimizer muon (the default), DeepSpeed's Muon moves each
weight matrix of the blocks along its gradient orthogonalized (all singular values alike, the
direction U V^T of the gradient's SVD), scaled by --muon-lr and sqrt(rows/cols) for tall matrices,
while the embeddings and norms take AdamW's step at --lr. Checked on a real one-step run against a
gradient computed here by hand and torch.linalg.svd. (--optimizer adamw is what every other test
of training runs: test_train.py holds it to a plain PyTorch AdamW loop.)"""

import pytest
import torch
from conftest import TINY, run_train, tiny_start
from deepspeed.runtime.zero.muon.original_muon import ns_compute_dtype

from nanosft.checkpoint import load_model
from nanosft.data import to_batch
from nanosft.loss import masked_nll

MUON_LR, ADAM_LR = 0.02, 1e-2
# DeepSpeed iterates in fp16 where the CPU has fast fp16 (and fp32 elsewhere): a looser match then.
# Held as a direction (cosine) and a length: fp16's rounding moves single entries of a 32x32 step
# by up to 13% of the largest (Sapphire Rapids) while the direction stays within cosine 0.999.
# (The raw gradient's direction is 0.27-0.68 away: the test tells the two apart.)
NS_MIN_COSINE = 0.998 if ns_compute_dtype("gram") == torch.float32 else 0.995


def first_step(tiny_data, tmp_path, optimizer):
    """(weights before, weights after one real train.py step, the gradient of that step by hand)."""
    out = tmp_path / optimizer
    r = run_train("--data", str(tiny_data / "train.jsonl"), "--val-data", "", "--eval-data", "", "--out", str(out),
                  "--dtype", "fp32", *TINY, "--steps", "1", "--warmup-steps", "0", "--grad-clip", "0",
                  "--optimizer", optimizer, "--muon-lr", str(MUON_LR))  # the last of a repeated flag wins
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    model, (rows,) = tiny_start(tiny_data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    micro = [to_batch(rows, slice(i * 2, (i + 1) * 2)) for i in range(2)]  # --batch-size 2, --grad-accum 2
    total = sum(masked_nll(model(b["idx"], pos=b["pos"], doc=b["doc"]), b["targets"], b["loss_mask"])[0] for b in micro)
    (total / sum(b["loss_mask"].sum() for b in micro)).backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    return before, load_model(out)[0].state_dict(), grads


@pytest.fixture(scope="module")
def muon_step(tiny_data, tmp_path_factory):
    return first_step(tiny_data, tmp_path_factory.mktemp("muon"), "muon")


def is_matrix_of_a_block(name, w):
    return w.dim() == 2 and name.startswith("layers.")


def newton_schulz(g, steps=5):
    """Muon's orthogonalization written out: the quintic iteration X <- aX + (bA + cA^2)X, A = XX^T,
    on g scaled to spectral norm <= 1, pushes every singular value towards 1 and keeps U and V."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / g.norm()
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x if wide else x.T


def assert_adam_first_step(k, step, g, lr):
    """AdamW's first step, bias-corrected, is m/(sqrt(v) + eps) = g/(|g| + eps): exactly lr against
    the gradient's sign wherever |g| is well above eps, and never more than lr."""
    clear = g.abs() > 1e-5
    assert clear.float().mean() > 0.25, k  # (so that the check below has something to check)
    torch.testing.assert_close(step[clear], -lr * torch.sign(g[clear]), rtol=2e-3, atol=1e-7, msg=k)
    assert step.abs().max() <= lr * (1 + 1e-4), k


def test_muon_steps_each_block_matrix_along_its_orthogonalized_gradient(muon_step):
    before, after, grads = muon_step
    matrices = [k for k in grads if is_matrix_of_a_block(k, before[k])]
    assert len(matrices) == 2 * 4  # per layer: q, k and v (one matrix), o, the MLP's gate and up (one), down
    for k in matrices:
        rows, cols = before[k].shape
        step = (before[k] - after[k]) / (MUON_LR * max(1.0, rows / cols) ** 0.5)
        # the first step's momentum is a multiple of the gradient, and the iteration ignores the scale
        want = newton_schulz(grads[k])
        assert torch.cosine_similarity(step.flatten(), want.flatten(), 0) > NS_MIN_COSINE, k
        assert torch.cosine_similarity(step.flatten(), grads[k].flatten(), 0) < 0.9, k  # not the plain gradient
        assert abs(step.norm() / want.norm() - 1) < 0.01, k
        # what that means, by the SVD: the gradient's singular values spread over orders of
        # magnitude; the step's are brought near 1 (~0.7-1.2 after five iterations) for every
        # direction above 1% of the gradient's norm (the iteration multiplies a small one by ~3.4
        # each time, so those far below lag behind: a gradient of low rank keeps its low rank)
        s, sv = torch.linalg.svdvals(grads[k]), torch.linalg.svdvals(step)  # (both descending)
        n = int((s > 1e-2 * s.norm()).sum())
        assert n >= 4 and 0.5 < sv[:n].min() and sv.max() < 1.6, (k, n, sv)
        assert s[0] / s[n - 1] > 3 * sv[:n].max() / sv[:n].min(), k


def test_muon_leaves_embeddings_and_norms_to_adamw(muon_step):
    before, after, grads = muon_step
    others = [k for k in grads if not is_matrix_of_a_block(k, before[k])]  # (lm_head is embed_tokens, tied)
    assert "embed_tokens.weight" in others and any(k.endswith("norm.weight") for k in others)
    for k in others:
        assert_adam_first_step(k, after[k] - before[k], grads[k], ADAM_LR)


def test_adamw_steps_every_weight_by_its_sign_so_its_matrix_steps_are_not_orthogonal(tiny_data, tmp_path):
    before, after, grads = first_step(tiny_data, tmp_path, "adamw")
    k = "layers.0.self_attn.qkv_proj.weight"
    assert_adam_first_step(k, after[k] - before[k], grads[k], ADAM_LR)
    sv = torch.linalg.svdvals((before[k] - after[k]) / ADAM_LR)
    assert sv.max() / sv.median() > 1.6  # what Muon's steps never are (above)
