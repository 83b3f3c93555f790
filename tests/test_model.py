"""model.py promises: decoding through the KV cache gives the same logits as one full forward, a
packed row (several conversations, positions restarting) gives each conversation exactly the
logits it would get alone, greedy generation equals re-running the full model every token, and
given targets the model returns the masked loss of its own logits, with the same gradients."""

import pytest
import torch
import torch.nn.functional as F

from nanosft.generate import generate, greedy_batch, sample_batch, sample_next
from nanosft.model import ModelConfig, Transformer


def tiny(impl="sdpa", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=97, dim=32, n_layer=2, n_head=4, n_kv_head=2, ffn_hidden=64,
                      max_seq_len=64, attn_impl=impl, **kw)
    return Transformer(cfg).double().eval()


def test_kv_cache_decoding_equals_full_forward():
    for impl in ("manual", "sdpa"):
        model = tiny(impl)
        idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
        full = model(idx)  # (2, 20, 97)
        cache = model.new_cache(batch=2, max_len=20)
        pieces = [model(idx[:, :7], cache=cache)]  # prefill 7, then one token at a time
        pieces += [model(idx[:, t:t + 1], cache=cache) for t in range(7, 20)]
        torch.testing.assert_close(torch.cat(pieces, 1), full)


def test_packed_row_equals_each_conversation_alone():
    model = tiny()
    g = torch.Generator().manual_seed(2)
    a, b, c = (torch.randint(0, 97, (1, n), generator=g) for n in (5, 9, 4))
    row = torch.cat([a, b, c], 1)
    doc = torch.tensor([[0] * 5 + [1] * 9 + [2] * 4])
    pos = torch.cat([torch.arange(5), torch.arange(9), torch.arange(4)])[None]
    packed = model(row, pos=pos, doc=doc)
    alone = torch.cat([model(a), model(b), model(c)], 1)
    torch.testing.assert_close(packed, alone)
    # without the document mask and restarted positions the conversations leak into each other
    assert not torch.allclose(model(row)[:, 5:], alone[:, 5:])


def test_greedy_generation_equals_argmax_of_full_forward_each_step():
    model = tiny()
    prompt = [3, 14, 15, 92, 65]
    got = list(generate(model, prompt, max_new_tokens=12))
    ids = list(prompt)
    for _ in range(12):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert got == ids[len(prompt):]


def test_generation_stops_at_a_stop_token_and_never_yields_it():
    model = tiny()
    free = list(generate(model, [1, 2, 3], max_new_tokens=10))
    stop = free[4]
    assert list(generate(model, [1, 2, 3], 10, stop_ids={stop})) == free[:free.index(stop)]


def test_prompts_of_one_length_decoded_together_get_the_tokens_each_gets_alone():
    model = tiny()
    with torch.no_grad():  # larger weights than at init: replies that wander rather than repeat one token
        for p in model.parameters():
            p.normal_(0, 0.3)
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(0, 97, (6, 8), generator=g).tolist()
    free = list(generate(model, prompts[0], 10))
    stop = free[3]  # ends the first reply early, maybe others too
    limits = [10, 10, 2, 0, 10, 60]  # the last one is cut at the context: 64 positions - 8
    alone = [list(generate(model, p, n, stop_ids={stop})) for p, n in zip(prompts, limits)]
    assert greedy_batch(model, prompts, limits, stop_ids={stop}) == alone
    assert alone[0] == free[:free.index(stop)] and len(alone[2]) <= 2 and alone[3] == [] and len(alone[5]) <= 56
    assert max(map(len, alone)) > 3  # rows that stopped rode along while others went on
    with pytest.raises(ValueError, match="one length"):
        greedy_batch(model, [[1, 2], [1, 2, 3]], [4, 4])


def test_top_k_one_is_greedy_and_top_p_keeps_the_head_of_the_distribution():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    g = torch.Generator().manual_seed(0)
    assert all(sample_next(logits, 1.0, top_k=1, generator=g) == 1 for _ in range(20))
    # probabilities ~ [0.03, 0.51, 0.46, 0.01]: token 1 alone reaches 0.5, tokens 1 and 2 reach 0.9
    assert {sample_next(logits, 1.0, top_p=0.5, generator=g) for _ in range(50)} == {1}
    assert {sample_next(logits, 1.0, top_p=0.9, generator=g) for _ in range(50)} == {1, 2}
    assert sample_next(logits) == 1  # temperature 0: argmax


def test_tied_embeddings_share_one_matrix_and_untied_do_not():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    assert untied.num_params() - tied.num_params() == 97 * 32


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    from nanosft.block import Block
    runs = []  # decoder-block forward passes, counted
    forward = Block.forward
    monkeypatch.setattr(Block, "forward", lambda self, *a, **k: (runs.append(1), forward(self, *a, **k))[1])
    idx = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    grads, calls = [], []
    for ckpt in (False, True):
        model = tiny().train()
        model.grad_checkpointing = ckpt
        runs.clear()
        model(idx).logsumexp(-1).mean().backward()
        calls.append(len(runs))
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert calls == [2, 4]  # checkpointed: each of the 2 blocks ran again in the backward pass
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)


def test_forward_with_targets_returns_the_masked_loss_of_its_logits_and_the_same_gradients():
    # the tied head's gradient reaches the embedding by both of its uses; the loss from the logits
    # (loss.py) and the fused one (fused_loss.py, chosen for large vocabularies) agree
    for tie, fused in ((True, False), (False, False), (True, True), (False, True)):
        model = tiny(tie_embeddings=tie).train()
        model.fused_loss = fused
        g = torch.Generator().manual_seed(3)
        idx, targets = torch.randint(0, 97, (2, 18), generator=g), torch.randint(0, 97, (2, 18), generator=g)
        mask = (torch.rand(2, 18, generator=g) < 0.5).long()
        doc = torch.tensor([[0] * 7 + [1] * 11, [0] * 18])
        pos = torch.tensor([list(range(7)) + list(range(11)), list(range(18))])
        logits = model(idx, pos=pos, doc=doc)  # (2, 18, 97), fp64
        ref = F.cross_entropy(logits.flatten(0, 1), targets.masked_fill(mask == 0, -100).flatten(), reduction="sum")
        ref_grads = torch.autograd.grad(ref, list(model.parameters()))
        total, count = model(idx, pos=pos, doc=doc, targets=targets, loss_mask=mask)
        assert count == mask.sum()
        torch.testing.assert_close(total, ref)
        for a, b in zip(torch.autograd.grad(total, list(model.parameters())), ref_grads):
            torch.testing.assert_close(a, b)


def test_sampled_batches_repeat_with_the_seed_keep_the_stop_token_and_draw_from_the_softmax():
    model = tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    prompts = [[5, 6, 7]] * 4000  # one prompt, many draws: the first token's frequencies
    draw = lambda seed, limits, stop=(): sample_batch(model, prompts, limits, stop, temperature=0.7,  # noqa: E731
                                                     generator=torch.Generator().manual_seed(seed))
    (a, _), (b, _), (c, _) = draw(1, [1] * 4000), draw(1, [1] * 4000), draw(2, [1] * 4000)
    assert a == b and a != c  # the generator alone decides
    with torch.no_grad():
        want = torch.softmax(model(torch.tensor([[5, 6, 7]]))[0, -1].float() / 0.7, -1)  # (V,)
    seen = torch.bincount(torch.tensor([r[0] for r in a]), minlength=97).float() / 4000
    assert (seen - want).abs().max() < 0.03  # 4,000 draws: a few standard errors at most
    # a stop token drawn ends the reply and is kept; a reply cut by its limit is not "stopped"
    stop = max(set(r[0] for r in a), key=lambda t: sum(r[0] == t for r in a))
    replies, stopped = draw(1, [5] * 4000, {stop})
    for r, s in zip(replies, stopped):
        assert s == (r[-1] == stop) and stop not in r[:-1] and (s or len(r) == 5)
    assert any(stopped) and not all(stopped)
