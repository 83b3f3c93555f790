"""data.py promises: bad JSONL lines are reported with file, line and reason (all of them, nothing
skipped in silence); packing keeps every conversation whole, restarts positions per conversation,
and loses no token; the batch stream reshuffles every epoch, skips no row at an epoch's end, and
can be stopped and restarted at any micro-batch."""

import json
import random

import numpy as np
import pytest
import torch

from nanosft.data import Batches, Blend, epoch_rows, load_jsonl, pack, padding_fraction, parse_source, split_off, to_batch


def write(tmp_path, lines):
    p = tmp_path / "chat.jsonl"
    p.write_bytes(b"\n".join(l if isinstance(l, bytes) else l.encode() for l in lines) + b"\n")
    return p


GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})


def test_good_file_with_blank_lines_loads(tmp_path):
    p = write(tmp_path, [GOOD, "", "   ", json.dumps({"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"}]})])
    recs = load_jsonl(p)
    assert len(recs) == 2 and recs[1]["messages"][2]["content"] == "你好！"


def test_every_bad_line_is_reported_with_file_line_and_reason(tmp_path):
    p = write(tmp_path, [
        GOOD,
        '{"messages": [{"role": "user", "content": "hi"}',                      # 2 truncated JSON
        '[1, 2]',                                                                # 3 not an object
        '{"messages": [{"role": "robot", "content": "x"}]}',                     # 4 unknown role
        '{"messages": [{"role": "user", "content": 5}]}',                        # 5 non-string
        '{"messages": [{"role": "user", "content": "only a question"}]}',        # 6 no assistant
        b'{"messages": "\xff\xfe"}',                                             # 7 invalid UTF-8
        '{"text": "wrong format"}',                                              # 8 no messages
        GOOD,
    ])
    with pytest.raises(ValueError) as e:
        load_jsonl(p)
    msg = str(e.value)
    assert msg.startswith("7 bad line(s)")
    for line, reason in [(2, "invalid JSON"), (3, "expected a JSON object"), (4, "messages[0] has role 'robot'"),
                         (5, "messages[0] content is not a string"), (6, "the conversation ends with a user turn"),
                         (7, "invalid UTF-8"), (8, 'missing "messages"')]:
        assert f"{p}:{line}: {reason}" in msg, (line, msg)
    assert f"{p}:1:" not in msg and f"{p}:9:" not in msg


def test_only_the_first_20_errors_are_listed_but_all_are_counted(tmp_path):
    p = write(tmp_path, ["not json"] * 25)
    msg = str(pytest.raises(ValueError, load_jsonl, p).value)
    assert msg.startswith("25 bad line(s)") and "... and 5 more" in msg and msg.count("invalid JSON") == 20


def random_samples(n, seed=0, max_len=60):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        L = rng.randint(2, max_len)
        out.append((np.arange(L, dtype=np.int32) + 1000 * i, np.array([rng.randint(0, 1) for _ in range(L)], dtype=np.int8)))
    return out


def test_packing_keeps_conversations_whole_and_loses_nothing():
    samples = random_samples(300)
    packed = pack(samples, row_len=128, pad_id=-7)
    found = []
    for r in range(len(packed["ids"])):
        doc, ids, pos, mask = (packed[k][r] for k in ("doc", "ids", "pos", "mask"))
        for d in sorted(set(doc[doc >= 0].tolist())):
            sel = doc == d
            span = np.flatnonzero(sel)
            assert (np.diff(span) == 1).all()  # contiguous
            assert (pos[sel] == np.arange(sel.sum())).all()  # positions restart at 0
            found.append((tuple(ids[sel]), tuple(mask[sel])))
        assert (ids[doc < 0] == -7).all() and (mask[doc < 0] == 0).all()
    assert sorted(found) == sorted((tuple(i), tuple(m)) for i, m in samples)
    assert padding_fraction(packed) < 0.1  # short samples fill rows well


def test_batches_shift_targets_and_mask_by_one():
    packed = pack(random_samples(20), row_len=64, pad_id=0)
    b = to_batch(packed, slice(0, 2))
    assert b["idx"].shape == (2, 63)
    assert (b["targets"] == b["idx"].roll(-1, 1))[:, :-1].all()
    # shifted with the targets, and off where the target opens the next conversation of the row
    seam = packed["doc"][:2, 1:] != packed["doc"][:2, :-1]
    assert (b["loss_mask"].numpy() == packed["mask"][:2, 1:] * ~seam).all()
    assert (packed["mask"][:2, 1:] * seam).any()  # there was a supervised token to switch off


def test_epochs_reshuffle_and_ranks_split_rows_evenly():
    samples = random_samples(200)
    e0, e1 = (epoch_rows(samples, 128, 0, seed=1, epoch=e) for e in (0, 1))
    assert not np.array_equal(e0["ids"][:5], e1["ids"][:5])  # every epoch has its own order
    assert np.array_equal(e0["ids"], epoch_rows(samples, 128, 0, seed=1, epoch=0)["ids"])  # reproducible
    shards = [epoch_rows(samples, 128, 0, seed=1, epoch=0, rank=r, world=3) for r in range(3)]
    assert len({len(s["ids"]) for s in shards}) == 1  # same number of forwards on every rank
    # together the ranks hold every row once, plus empty rows (no token, no mask) as filler
    rows = [tuple(r) for s in shards for r, d in zip(s["ids"], s["doc"]) if (d >= 0).any()]
    assert sorted(rows) == sorted(map(tuple, e0["ids"])) and len(set(rows)) == len(rows)
    assert sum(int(s["mask"].sum()) for s in shards) == int(e0["mask"].sum())


def test_batch_stream_trains_every_row_and_carries_an_epochs_leftover_into_the_next():
    samples = random_samples(200)
    per_epoch = [epoch_rows(samples, 128, 0, seed=1, epoch=e) for e in range(4)]
    stream = Batches(samples, 128, 0, batch_size=7, seed=1)
    n = sum(len(e["ids"]) for e in per_epoch[:3]) // 7  # micro-batches in three epochs' rows
    want = np.concatenate([e["ids"] for e in per_epoch[:3]])
    want_doc = np.concatenate([e["doc"] for e in per_epoch[:3]])
    i = 0
    for _ in range(n):  # the epochs' rows in order, none skipped at the seams
        b = stream.next()
        T = b["idx"].shape[1] + 1
        assert np.array_equal(np.concatenate([b["idx"], b["targets"][:, -1:]], 1), want[i:i + 7, :T])
        assert (want_doc[i:i + 7, T:] < 0).all()  # what to_batch left off is padding
        i += 7
    assert stream.epoch == 2 and len(per_epoch[0]["ids"]) % 7  # an epoch did end mid-batch
    assert len(want) - i < 7


def test_batch_stream_resumes_at_the_same_micro_batch():
    samples = random_samples(150)
    a = Batches(samples, 128, 0, batch_size=5, seed=3)
    for _ in range(37):  # past the end of the first epoch
        a.next()
    state = a.state_dict()
    assert state["epoch"] >= 1
    b = Batches(samples, 128, 0, batch_size=5, seed=3)
    b.load_state_dict(state)
    for _ in range(30):
        x, y = a.next(), b.next()
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_without_packing_each_conversation_has_a_row_and_batches_group_similar_lengths():
    samples = random_samples(300, max_len=120)
    rows = epoch_rows(samples, 128, 0, seed=1, epoch=0, packing=False, window=100)
    assert len(rows["ids"]) == 300 and (rows["doc"] <= 0).all()  # one conversation per row
    lengths = (rows["doc"] == 0).sum(1)
    assert sorted(map(tuple, rows["ids"][:, :5])) == sorted(tuple(np.pad(i[:5], (0, max(0, 5 - len(i))))) for i, _ in samples)
    for w in range(0, 300, 100):  # sorted within each window, longest first
        assert (np.diff(lengths[w:w + 100]) <= 0).all()
    b = to_batch(rows, slice(150, 154), trim=True)  # the columns every row leaves empty are not computed
    assert b["idx"].shape[1] == lengths[150:154].max() - 1
    assert b["doc"].shape == b["targets"].shape == b["loss_mask"].shape == b["pos"].shape


def test_packing_wastes_under_5_percent_on_long_tailed_lengths():
    """Instruction data is long-tailed: median ~150 tokens, some over 1,000."""
    rng = np.random.default_rng(0)
    lengths = np.clip(np.exp(rng.normal(np.log(150), 0.9, 5000)).astype(int), 8, 2048)
    assert 140 <= np.median(lengths) <= 160 and (lengths > 1000).sum() > 50
    samples = [(np.zeros(n, np.int32), np.ones(n, np.int8)) for n in lengths]
    assert padding_fraction(pack(samples, 2048, 0)) < 0.05


def test_packed_rows_give_each_conversation_its_own_loss_and_logits():
    """fp32, a real model: one packed row of several conversations == each conversation alone."""
    from nanosft.loss import masked_nll
    from nanosft.model import ModelConfig, Transformer
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, dim=32, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=128)).eval()
    rng = random.Random(5)
    samples = [(np.array([rng.randrange(97) for _ in range(n)], np.int32), np.array([rng.randint(0, 1) for _ in range(n)], np.int8))
               for n in (17, 40, 9, 33, 25)]
    packed = pack(samples, 128, pad_id=0)
    assert len(packed["ids"]) == 1  # all five share one row
    b = to_batch(packed, slice(0, 1))
    with torch.no_grad():
        logits = model(b["idx"], pos=b["pos"], doc=b["doc"])
        total, _ = masked_nll(logits, b["targets"], b["loss_mask"])
        alone_total, start = 0.0, 0
        for ids, mask in samples:
            x = torch.from_numpy(ids.astype(np.int64))[None]
            alone = model(x[:, :-1])
            n = len(ids) - 1
            torch.testing.assert_close(logits[:, start:start + n], alone, rtol=1e-5, atol=1e-5)
            alone_total += masked_nll(alone, x[:, 1:], torch.from_numpy(mask[1:].astype(np.int64))[None])[0].item()
            start += len(ids)
    assert abs(total.item() - alone_total) <= 1e-5 * abs(alone_total)


def test_blending_gives_each_source_its_weight_of_every_epoch():
    small, large = random_samples(100, seed=1), random_samples(1000, seed=2)
    blend = Blend([small, large], [0.5, 0.5])
    assert len(blend) == 1100 and blend.counts == [550, 550]
    e0, e1 = blend.epoch(seed=3, epoch=0), blend.epoch(seed=3, epoch=1)
    which = {id(x): (src, i) for src, samples in enumerate((small, large)) for i, x in enumerate(samples)}
    picked = [which[id(x)] for x in e0]
    repeats = np.bincount([i for src, i in picked if src == 0])
    assert len(repeats) == 100 and set(repeats) == {5, 6}  # the small source upsampled as evenly as it goes
    assert sum(src == 1 for src, _ in picked) == 550 and len({i for src, i in picked if src == 1}) == 550
    large_half = lambda e: {which[id(x)] for x in e if which[id(x)][0] == 1}  # noqa: E731
    assert large_half(e0) != large_half(e1)  # the large source shows another half each epoch
    assert [which[id(x)] for x in blend.epoch(seed=3, epoch=0)] == picked  # reproducible
    assert parse_source("a.jsonl:0.7") == ("a.jsonl", 0.7) and parse_source("dir/b.json") == ("dir/b.json", 1.0)
    with pytest.raises(ValueError, match="positive"):
        parse_source("a.jsonl:-1")


def test_validation_split_is_held_out_of_training():
    samples = random_samples(200)
    kept, held = split_off(samples, 0.1, seed=5)
    assert len(held) == 20 and len(kept) == 180
    assert {id(s) for s in kept}.isdisjoint({id(s) for s in held})
    assert [id(s) for s in split_off(samples, 0.1, seed=5)[1]] == [id(s) for s in held]


def test_prompt_files_must_end_with_a_user_turn(tmp_path):
    from nanosft.data import check_prompt
    p = write(tmp_path, [json.dumps({"messages": [{"role": "user", "content": "hi"}]}), GOOD])
    msg = str(pytest.raises(ValueError, load_jsonl, p, check_prompt).value)
    assert f"{p}:2: the last message must be a user turn" in msg and f"{p}:1:" not in msg


def test_a_preference_pair_renders_two_rows_supervised_on_their_replies_and_never_cuts_one():
    from nanosft.data import render_pairs
    from nanosft.template import ChatTemplate
    from nanosft.tokenizer import Tokenizer
    template = ChatTemplate(Tokenizer.train(["What is two plus two? It is four. It is five. tell me more"] * 20, 300))
    prompt = [{"role": "user", "content": "tell me more " * 8}, {"role": "assistant", "content": "more " * 8},
              {"role": "user", "content": "What is two plus two?"}]
    rec = {"messages": prompt, "chosen": "It is four.", "rejected": "It is five, I think."}
    (samples, counts) = render_pairs([rec], template, 1000)
    (chosen_ids, chosen_mask), (rejected_ids, rejected_mask) = samples[0]
    want = template.render(prompt + [{"role": "assistant", "content": "It is four."}], "last-assistant")
    assert list(chosen_ids) == want[0] and list(chosen_mask) == want[1] and counts == {"truncated": 0, "dropped": 0}
    tok = template.tok
    assert tok.decode([i for i, m in zip(rejected_ids, rejected_mask) if m]) == "It is five, I think."
    # a short row: the oldest exchange goes from both sides; shorter still, the pair is left out whole
    short = len(template.render(prompt[2:] + [{"role": "assistant", "content": rec["rejected"]}])[0])
    samples, counts = render_pairs([rec], template, short)
    assert counts == {"truncated": 1, "dropped": 0} and len(samples[0][1][0]) == short
    assert render_pairs([rec], template, short - 1) == ([], {"truncated": 0, "dropped": 1})
