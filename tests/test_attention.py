"""attention.py promises: the explicit math and the fused SDPA path are the same function (outputs
and gradients), grouped KV heads are exactly PyTorch's own GQA, attention never looks ahead, and
decoding through the KV cache reproduces a full forward."""

import torch
import torch.nn.functional as F

from nanosft.attention import CausalSelfAttention, attend_manual, attend_sdpa, causal_mask
from nanosft.embedding import Rotary


def rand_qkv(B=2, H=4, T=9, S=9, hd=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, hd, generator=g, dtype=torch.float64, requires_grad=True) for n in (T, S, S)]


def test_manual_attention_equals_sdpa_outputs_and_gradients():
    for mask_kind in ("causal", "block", "offset"):
        T, S = (3, 9) if mask_kind == "offset" else (9, 9)
        q, k, v = rand_qkv(T=T, S=S)
        mask = None
        if mask_kind == "block":  # two packed documents: 0..3 and 4..8
            doc = torch.tensor([0] * 4 + [1] * 5)
            mask = (doc[:, None] == doc[None, :]) & causal_mask(9, 9, "cpu")
        out_m = attend_manual(q, k, v, mask)
        out_s = attend_sdpa(q, k, v, mask)
        torch.testing.assert_close(out_m, out_s, rtol=1e-10, atol=1e-10)
        g_m = torch.autograd.grad(out_m.pow(2).sum(), (q, k, v))
        g_s = torch.autograd.grad(out_s.pow(2).sum(), (q, k, v))
        for a, b in zip(g_m, g_s):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_manual_attention_equals_the_textbook_formula():
    q, k, v = rand_qkv(T=5, S=5)
    scores = q @ k.transpose(-2, -1) / 16 ** 0.5
    scores = scores + torch.triu(torch.full((5, 5), float("-inf"), dtype=torch.float64), 1)
    torch.testing.assert_close(attend_manual(q, k, v), torch.softmax(scores, -1) @ v)


def module_pair(n_head=4, n_kv_head=2, dim=32, seed=0):
    torch.manual_seed(seed)
    a = CausalSelfAttention(dim, n_head, n_kv_head, impl="manual").double()
    b = CausalSelfAttention(dim, n_head, n_kv_head, impl="sdpa").double()
    b.load_state_dict(a.state_dict())
    return a, b


def rope(B, T, head_dim, start=0):
    pos = torch.arange(start, start + T).expand(B, T)
    return Rotary(head_dim)(pos, torch.float64)


def test_attention_module_paths_agree_for_mha_gqa_and_mqa():
    for n_kv in (4, 2, 1):
        a, b = module_pair(n_kv_head=n_kv)
        x = torch.randn(2, 7, 32, dtype=torch.float64, requires_grad=True)
        cos, sin = rope(2, 7, 8)
        ya, yb = a(x, cos, sin), b(x, cos, sin)
        torch.testing.assert_close(ya, yb)
        ga = torch.autograd.grad(ya.sum(), [x] + list(a.parameters()))
        gb = torch.autograd.grad(yb.sum(), [x] + list(b.parameters()))
        for p, q in zip(ga, gb):
            torch.testing.assert_close(p, q)


def test_grouped_kv_heads_match_pytorch_enable_gqa():
    a, _ = module_pair(n_head=6, n_kv_head=2, dim=48)
    x = torch.randn(2, 5, 48, dtype=torch.float64)
    cos, sin = rope(2, 5, 8)
    # reference: PyTorch's own GQA broadcasting on the un-repeated key/value heads
    from nanosft.embedding import apply_rotary
    wq, wk, wv = a.qkv_proj.weight.split([48, 16, 16])  # the fused matrix stacks q, k, v rows
    q = apply_rotary((x @ wq.T).view(2, 5, 6, 8).transpose(1, 2), cos, sin)
    k = apply_rotary((x @ wk.T).view(2, 5, 2, 8).transpose(1, 2), cos, sin)
    v = (x @ wv.T).view(2, 5, 2, 8).transpose(1, 2)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref = a.o_proj(ref.transpose(1, 2).reshape(2, 5, 48))
    torch.testing.assert_close(a(x, cos, sin), ref)


def test_changing_a_future_token_never_changes_earlier_outputs():
    for impl_module in module_pair():
        x = torch.randn(1, 8, 32, dtype=torch.float64)
        cos, sin = rope(1, 8, 8)
        y = impl_module(x, cos, sin)
        x2 = x.clone()
        x2[:, 5] += 1.0
        y2 = impl_module(x2, cos, sin)
        torch.testing.assert_close(y[:, :5], y2[:, :5])
        assert not torch.allclose(y[:, 5:], y2[:, 5:])
