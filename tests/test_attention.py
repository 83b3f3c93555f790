"""attention.py promises: the explicit math and the fused SDPA path are the same function (outputs
and gradients), grouped KV heads are exactly PyTorch's own GQA, attention never looks ahead, and
decoding through the KV cache reproduces a full forward -- for every variant in VARIANTS. A sliding
window hides every key beyond it; ALiBi's slopes are the paper's (as transformers' BLOOM computes
them) and its penalty, the soft-cap and QK-norm are the textbook formulas. (QK-norm and the sliding
window are also checked against transformers' Qwen3 and Mistral in test_checkpoint.py.)"""

import math

import pytest
import torch
import torch.nn.functional as F

from nanosft import attention
from nanosft.attention import (VARIANTS, BlockwiseMask, CausalSelfAttention, alibi_slopes, attend_manual,
                               attend_sdpa, attention_mask)
from nanosft.embedding import Rotary
from nanosft.model import ModelConfig, Transformer


def rand_qkv(B=2, H=4, T=9, S=9, hd=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, hd, generator=g, dtype=torch.float64, requires_grad=True) for n in (T, S, S)]


@pytest.mark.parametrize("mask_kind", ["causal", "block", "offset", "window", "window_offset", "alibi",
                                       "alibi_block", "alibi_window_offset"])
def test_manual_attention_equals_sdpa_outputs_and_gradients(mask_kind):
    T, S = (3, 9) if "offset" in mask_kind else (9, 9)  # offset: 6 keys cached before the 3 queries
    q, k, v = rand_qkv(T=T, S=S)
    doc = torch.tensor([[0] * 4 + [1] * 5] * 2) if "block" in mask_kind else None  # packed: 0..3, 4..8
    mask = attention_mask(T, S, "cpu", doc, window=3 if "window" in mask_kind else 0,
                          slopes=alibi_slopes(4).double() if "alibi" in mask_kind else None)
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
    a = CausalSelfAttention(ModelConfig(dim=dim, n_head=n_head, n_kv_head=n_kv_head, attn_impl="manual")).double()
    b = CausalSelfAttention(ModelConfig(dim=dim, n_head=n_head, n_kv_head=n_kv_head, attn_impl="sdpa")).double()
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


# ---- the variants, at the level of the whole model (where the mask and positions are built)

def model_of(variant, impl="sdpa", seed=0, n_layer=2):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=97, dim=32, n_layer=n_layer, n_head=4, ffn_hidden=64, max_seq_len=64,
                      **{"n_kv_head": 2, "attn_impl": impl, **VARIANTS[variant]})  # the variant's fields win
    model = Transformer(cfg).double().eval()
    with torch.no_grad():  # every weight moved off its initial value, so weights that start neutral
        for p in model.parameters():  # (norm scales of one, a variant's identity matrix) still matter
            p.add_(torch.randn_like(p), alpha=0.05)
    return model


# variants computed both ways; the others fix their own function (softcap: the manual path only)
TWO_PATHS = [v for v in VARIANTS if "attn_impl" not in VARIANTS[v] and not VARIANTS[v].get("softcap")]
EACH_PATH = [(v, impl) for v in VARIANTS for impl in (("manual", "sdpa") if v in TWO_PATHS else ("manual",))]


def test_softcap_asks_for_the_manual_path_with_a_one_line_notice(capsys):
    import nanosft.attention
    nanosft.attention.NOTICED.clear()
    model = model_of("softcap", impl="sdpa")
    assert {layer.self_attn.impl for layer in model.layers} == {"manual"}
    assert capsys.readouterr().err.strip().splitlines() == ["attention: sdpa cannot soft-cap scores, using the manual path"]
    assert {layer.self_attn.impl for layer in model_of("alibi", impl="sdpa").layers} == {"sdpa"}


@pytest.mark.parametrize("variant", TWO_PATHS)
def test_every_variant_manual_path_equals_sdpa_path_with_packed_rows(variant):
    manual, sdpa = model_of(variant, "manual"), model_of(variant, "sdpa")
    manual.train(), sdpa.train()
    idx = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    doc = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])  # the first row packs two conversations
    pos = torch.stack([torch.cat([torch.arange(10), torch.arange(14)]), torch.arange(24)])
    outs = [m(idx, pos=pos, doc=doc) for m in (manual, sdpa)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    grads = [torch.autograd.grad(o.pow(2).sum(), list(m.parameters())) for o, m in zip(outs, (manual, sdpa))]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("variant, impl", EACH_PATH)
def test_every_variant_never_looks_ahead_and_decodes_through_the_kv_cache_like_a_full_forward(variant, impl):
    model = model_of(variant, impl)
    idx = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(2))
    full = model(idx)  # (2, 30, 97)
    changed = idx.clone()
    changed[:, 20] = (changed[:, 20] + 1) % 97
    after = model(changed)
    torch.testing.assert_close(after[:, :20], full[:, :20], rtol=0, atol=0)  # earlier positions: untouched
    assert not torch.allclose(after[:, 20], full[:, 20])
    cache = model.new_cache(batch=2, max_len=30)
    pieces = [model(idx[:, :7], cache=cache)]  # prefill 7, then one token at a time, past the window
    pieces += [model(idx[:, t:t + 1], cache=cache) for t in range(7, 30)]
    torch.testing.assert_close(torch.cat(pieces, 1), full)


@pytest.mark.parametrize("variant, impl", EACH_PATH)
def test_a_slot_cache_decodes_rows_of_different_lengths_each_as_if_alone(variant, impl):
    """The server's cache: conversations of different lengths in one forward, in any order of slots,
    a slot reused after a longer conversation (its stale keys must stay hidden)."""
    model = model_of(variant, impl)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 97, (n,), generator=g) for n in (5, 12, 1, 9)]
    cache = model.new_cache(batch=4, max_len=40, slots=True)
    with torch.no_grad():
        cache.use([1])
        model(torch.randint(0, 97, (1, 30), generator=g), cache=cache)  # an earlier, longer conversation in slot 1
        cache.lens[1] = 0  # ... over: the slot is reused
        slots = [2, 1, 0, 3]
        for slot, seq in zip(slots, seqs):  # each prompt prefilled into its slot, except its last token
            cache.use([slot])
            model(seq[None, :-1], cache=cache) if len(seq) > 1 else None
        order = [3, 0, 2, 1]  # the decode step's rows: slots in another order than prefilled
        cache.use([slots[i] for i in order])
        step = model(torch.stack([seqs[i][-1:] for i in order]), cache=cache)  # (4, 1, V)
        for row, i in enumerate(order):  # each as a full forward of its sequence alone
            torch.testing.assert_close(step[row, 0], model(seqs[i][None])[0, -1], rtol=1e-5, atol=1e-5)
    assert [cache.lens[s] for s in slots] == [len(seq) for seq in seqs]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_computes_something_no_other_variant_does(variant):
    """A variant that silently did nothing (a soft-cap never applied, ALiBi without its slopes)
    would compute what another variant computes: same weights wherever the shapes allow."""
    idx = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(4))
    ours = model_of(variant)
    with torch.no_grad():  # large q/k weights: scores beyond the soft-cap
        for layer in ours.layers:
            layer.self_attn.qkv_proj.weight.mul_(4.0)
    for other in VARIANTS:
        if other != variant:
            m = model_of(other)
            m.load_state_dict({k: v for k, v in ours.state_dict().items()
                               if k in m.state_dict() and m.state_dict()[k].shape == v.shape}, strict=False)
            assert not torch.allclose(m(idx), ours(idx), rtol=1e-6, atol=1e-6), other


@pytest.mark.parametrize("variant, rotations", [("gqa", 2), ("alibi", 0), ("nope", 0), ("qknorm", 2)])
def test_only_rope_rotates_queries_and_keys(variant, rotations, monkeypatch):
    import nanosft.attention
    calls = []
    rotate = nanosft.attention.apply_rotary
    monkeypatch.setattr(nanosft.attention, "apply_rotary", lambda *a: calls.append(1) or rotate(*a))
    model_of(variant)(torch.randint(0, 97, (1, 8)))
    assert len(calls) == rotations  # one per layer with RoPE, none otherwise


@pytest.mark.parametrize("impl", ["manual", "sdpa"])
def test_a_key_beyond_the_window_never_affects_the_output(impl):
    window = VARIANTS["window"]["window"]
    torch.manual_seed(0)
    attn = CausalSelfAttention(ModelConfig(dim=32, n_head=4, n_kv_head=2, window=window, attn_impl=impl)).double()
    T = window + 12
    x = torch.randn(1, T, 32, dtype=torch.float64)
    cos, sin = rope(1, T, 8)
    mask = attention_mask(T, T, "cpu", window=window)
    y = attn(x, cos, sin, mask)
    j = 5  # change one token: outputs at distance >= window from it must not move, nearer ones must
    x2 = x.clone()
    x2[:, j] += 1.0
    y2 = attn(x2, cos, sin, mask)
    for i in range(T):
        moved = not torch.allclose(y[:, i], y2[:, i], rtol=0, atol=0)
        assert moved == (j <= i < j + window), (i, moved)
    # through a stack of layers the reach adds up: n_layer * (window - 1) tokens back, no further
    model = model_of("window", impl, n_layer=2)
    idx = torch.randint(0, 97, (1, 2 * window + 8), generator=torch.Generator().manual_seed(3))
    changed = idx.clone()
    changed[:, 0] = (changed[:, 0] + 1) % 97
    reach = 2 * (window - 1)
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, reach + 1:], b[:, reach + 1:], rtol=0, atol=0)
    assert not torch.allclose(a[:, reach], b[:, reach])


def test_alibi_slopes_are_those_of_transformers_bloom():
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor  # the reference ALiBi
    for n_head in (1, 4, 6, 8, 12, 16):
        alibi = build_alibi_tensor(torch.ones(1, 3), n_head, torch.float64)  # (H, 1, 3): slope * position
        torch.testing.assert_close(alibi_slopes(n_head).double(), alibi[:, 0, 1])


def test_alibi_and_softcap_follow_the_textbook_formulas():
    q, k, v = rand_qkv(T=6, S=6)
    scores = q @ k.transpose(-2, -1) / 16 ** 0.5  # (B, H, T, S)
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    future = torch.where(j > i, float("-inf"), 0.0).double()
    slopes = torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8], dtype=torch.float64)[:, None, None]  # 4 heads
    alibi = torch.softmax(scores - slopes * (i - j) + future, -1) @ v
    torch.testing.assert_close(attend_manual(q, k, v, attention_mask(6, 6, "cpu", slopes=alibi_slopes(4))), alibi)
    capped = torch.softmax(2.0 * torch.tanh(scores / 2.0) + future, -1) @ v
    torch.testing.assert_close(attend_manual(q, k, v, softcap=2.0), capped)
    assert not torch.allclose(capped, attend_manual(q, k, v))  # the cap bit: these scores exceed 2


def test_qk_norm_gives_each_head_unit_rms_queries_and_keys():  # (before RoPE: the Qwen3 test in test_checkpoint)
    cfg = ModelConfig(dim=32, n_head=4, n_kv_head=2, qk_norm=True, pos_emb="none")
    attn = CausalSelfAttention(cfg).double()
    seen = {}
    attn.q_norm.register_forward_hook(lambda m, i, o: seen.update(q=o))
    attn.k_norm.register_forward_hook(lambda m, i, o: seen.update(k=o))
    attn(torch.randn(2, 5, 32, dtype=torch.float64) * 100, None, None)  # huge activations
    assert set(seen) == {"q", "k"}
    for t in seen.values():  # (B, heads, T, hd), weights still ones: each vector has rms 1
        torch.testing.assert_close(t.pow(2).mean(-1), torch.ones(t.shape[:-1], dtype=torch.float64))
    assert math.isclose(cfg.norm_eps, attn.q_norm.eps)


# ---- long rows: the mask a block of queries at a time (BlockwiseMask), never a (T, T) tensor

def packed_doc(T=200, seed=3):
    """doc (3, T) of packed rows: many conversations of 1-40 tokens; a single conversation; many
    conversations then padding (doc -1)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(3):
        lengths = [T] if r == 1 else [int(n) for n in torch.randint(1, 41, (T,), generator=g)]
        row = torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)])[:T]
        if r == 2:
            row[-23:] = -1
        rows.append(row)
    return torch.stack(rows)  # (3, T)


def test_each_block_of_queries_sees_keys_from_where_its_earliest_conversation_begins():
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 2, 2], [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]])
    # (q0, q1, k0): queries 4..7 include the second row's position 4, in its conversation from 0
    assert BlockwiseMask(10, "cpu", doc, block=4).blocks == [(0, 4, 0), (4, 8, 0), (8, 10, 5)]
    assert BlockwiseMask(10, "cpu", doc[:1], block=4).blocks == [(0, 4, 0), (4, 8, 3), (8, 10, 8)]
    assert BlockwiseMask(10, "cpu", doc, window=2, block=4).blocks == [(0, 4, 0), (4, 8, 3), (8, 10, 7)]
    assert BlockwiseMask(10, "cpu", block=16).blocks == [(0, 10, 0)]  # a short row: one block, the dense mask


@pytest.mark.parametrize("variant, impl", EACH_PATH)
def test_blockwise_attention_equals_the_dense_mask_in_loss_and_gradients_for_every_variant(variant, impl, monkeypatch):
    model = model_of(variant, impl).float().train()
    T = 200
    ids = torch.randint(0, 97, (3, T + 1), generator=torch.Generator().manual_seed(4))

    def loss_and_grads(block, doc):
        monkeypatch.setattr(attention, "BLOCK", block)
        pos = torch.stack([torch.cat([torch.arange(n) for n in torch.unique_consecutive(row, return_counts=True)[1]])
                           for row in doc])  # (rows, T) position inside each conversation
        rows = doc.size(0)
        loss, n = model(ids[:rows, :-1], pos=pos, doc=doc, targets=ids[:rows, 1:])
        return [loss / n, *torch.autograd.grad(loss / n, list(model.parameters()))]

    doc = packed_doc(T)
    # all three rows (a block's keys start where the earliest conversation of any row begins), the
    # rows of many conversations only (blocks cut at conversation starts), one row alone
    for rows in (doc, doc[[0, 2]], doc[[2]]):
        dense, blockwise = loss_and_grads(T, rows), loss_and_grads(24, rows)  # 24: blocks end mid-conversation
        for a, b in zip(dense, blockwise):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_no_mask_ever_spans_the_whole_row(monkeypatch):
    """2,048-token rows in blocks of 256 queries: a mask covers at most 256 queries and the keys back
    to the start of their earliest conversation (at most 40 tokens before the block), and only a
    row of one conversation reaches back to its start (256 x 2,048 at most, never 2,048 x 2,048)."""
    seen = []
    span_mask = attention.span_mask
    monkeypatch.setattr(attention, "span_mask", lambda q0, q1, k0, *a: seen.append((q1 - q0, q1 - k0)) or span_mask(q0, q1, k0, *a))
    monkeypatch.setattr(attention, "BLOCK", 256)
    model = model_of("gqa", "sdpa", n_layer=1).float().train()
    T = 2048
    doc = packed_doc(T)
    for rows, longest in ((doc[[0, 2]], 256 + 40), (doc[[1]], T)):
        seen.clear()
        model(torch.randint(0, 97, (rows.size(0), T)), doc=rows)[:, -1].sum().backward()
        assert max(q for q, _ in seen) == 256
        assert max(k for _, k in seen) <= longest
    assert max(k for _, k in seen) == T


def test_long_rows_under_torch_compile_give_the_same_outputs_without_recompiling(monkeypatch):
    """Blocks' bounds change with every batch's conversations; train.py --compile still compiles
    the model once (the blocks run outside the compiled graph, which would hold them as constants)."""
    import torch._dynamo
    monkeypatch.setattr(attention, "BLOCK", 16)
    model = model_of("alibi", "sdpa").float()
    compiled = torch.compile(model, backend="eager")  # dynamo's graphs, run without code generation
    torch._dynamo.reset()
    for seed in range(3):
        doc, idx = packed_doc(64, seed)[[0, 2]], torch.randint(0, 97, (2, 64))  # bounds differ with the seed
        torch.testing.assert_close(compiled(idx, doc=doc), model(idx, doc=doc), rtol=0, atol=0)
        monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)  # after the first batch
