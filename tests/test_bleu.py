"""bleu.py promises: corpus_bleu is sacrebleu's default corpus BLEU (`sacrebleu.corpus_bleu(hyps, [refs])
.score`: 13a tokenization, clipped n-gram counts summed over the corpus, brevity penalty on total
lengths, 'exp' smoothing, 0 when an order has no n-grams), and tokenize_13a is sacrebleu's 13a
tokenizer, token for token, on any string. With tokenize="zh" it is sacrebleu's Chinese BLEU, and
pick_tokenizer chooses that for Chinese references. Mismatched hypothesis/reference lists are an error."""

import random

import pytest
import sacrebleu
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

from nanosft.bleu import corpus_bleu, pick_tokenizer, tokenize_13a, tokenize_zh

WORDS = ("the cat sat on mat a dog ran fast and slow it's don't U.S. e.g. 3.5 1,000 2.0.1 -5 1990-2000 "
         "well-known state-of-the-art \"quoted\" 'single' (paren) [x] {y} 50% $5 a/b x+y <b> "
         "&amp; &quot;hi&quot; &lt;tag&gt; &amp;lt; Tom&amp;Jerry ... -- ! ? ; : "
         "你好 世界 中文，句子。 привет мир Ёлка naïve café — « » 「日本」").split()
ENDINGS = ("", "", "", ".", ",", "!", "?", "...", ";", "-", ".\"")


def sentence(rng, lo, hi):
    return " ".join(rng.choice(WORDS) + rng.choice(ENDINGS) for _ in range(rng.randint(lo, hi)))


def corrupt(rng, ref, noise):
    """A hypothesis from a reference: words dropped, replaced, inserted and swapped; sometimes cut short."""
    out = []
    for w in ref.split():
        r = rng.random()
        if r < noise / 4:
            continue
        out.append(rng.choice(WORDS) if r < noise / 2 else w)
        if r > 1 - noise / 4:
            out.append(rng.choice(WORDS))
    for _ in range(int(noise * len(out))):
        i = rng.randrange(max(len(out) - 1, 1))
        out[i:i + 2] = out[i:i + 2][::-1]
    if rng.random() < 0.3:  # shorter hypotheses make the brevity penalty bite
        out = out[:rng.randint(0, len(out))]
    return " ".join(out) + rng.choice(("", "", " ", "\n", "-\n", " \t"))


def random_corpus(seed, noise, n=250, lo=1, hi=30):
    rng = random.Random(seed)
    refs = [sentence(rng, lo, hi) for _ in range(n)]
    return [corrupt(rng, r, noise) for r in refs], refs


PLAIN = [w for w in WORDS if w.isalpha()]  # words that stay one token each


def without_long_matches(period, seed=10, n=200):
    # every period-th hypothesis word is one the references never contain, so no n-gram with
    # n >= period can match: the 'exp' smoothing path
    rng = random.Random(seed)
    refs = [" ".join(rng.choices(PLAIN, k=rng.randint(4, 20))) for _ in range(n)]
    hyps = [" ".join(f"zz{i}" if i % period == period - 1 else w for i, w in enumerate(r.split())) for r in refs]
    return hyps, refs


def short_sentences(seed=11, n=200):
    # one to three words on both sides, so there are no 4-grams at all
    rng = random.Random(seed)
    refs = [" ".join(rng.choices(PLAIN, k=rng.randint(1, 3))) for _ in range(n)]
    hyps = [" ".join(rng.sample(r.split(), len(r.split()))) for r in refs]
    return hyps, refs


def with_empty_hypotheses(seed=12, n=200):
    hyps, refs = random_corpus(seed, 0.2, n)
    rng = random.Random(seed)
    return [h if rng.random() < 0.7 else "" for h in hyps], refs


def reference(hyps, refs):
    return sacrebleu.corpus_bleu(hyps, [refs])


@pytest.mark.parametrize("seed,noise", [(0, 0.05), (1, 0.2), (2, 0.4), (3, 0.7), (4, 1.0)])
def test_random_corpora_match_sacrebleu(seed, noise):
    hyps, refs = random_corpus(seed, noise)
    ref = reference(hyps, refs)
    assert abs(corpus_bleu(hyps, refs) - ref.score) <= 1e-9
    assert ref.bp < 1 and 0 < ref.score < 100  # the brevity penalty and partial matches are exercised


@pytest.mark.parametrize("period", [4, 3])
def test_smoothing_when_higher_orders_never_match(period):
    hyps, refs = without_long_matches(period)
    ref = reference(hyps, refs)
    assert ref.counts[period - 1:] == [0] * (5 - period) and ref.counts[period - 2] > 0 and ref.score > 0
    assert abs(corpus_bleu(hyps, refs) - ref.score) <= 1e-9


def test_orders_without_ngrams_score_like_sacrebleu():
    hyps, refs = short_sentences()
    ref = reference(hyps, refs)
    assert ref.totals[3] == 0
    assert abs(corpus_bleu(hyps, refs) - ref.score) <= 1e-9
    # the same short sentences padded out with long ones get a real score again
    long_h, long_r = random_corpus(13, 0.2, n=50)
    ref = reference(hyps + long_h, refs + long_r)
    assert ref.totals[3] > 0 and ref.score > 0
    assert abs(corpus_bleu(hyps + long_h, refs + long_r) - ref.score) <= 1e-9


def test_identical_corpus_scores_100():
    _, refs = random_corpus(5, 0.0)
    assert reference(refs, refs).score == pytest.approx(100.0)
    assert corpus_bleu(refs, refs) == pytest.approx(100.0)


def test_empty_hypotheses():
    hyps, refs = with_empty_hypotheses()
    assert abs(corpus_bleu(hyps, refs) - reference(hyps, refs).score) <= 1e-9
    blank = [""] * len(refs)
    assert corpus_bleu(blank, refs) == reference(blank, refs).score == 0.0


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="one reference per hypothesis"):
        corpus_bleu(["a b c"], ["a b c", "d e f"])


def test_tokenize_13a_examples():
    assert tokenize_13a('He paid $3.5, not 1,000 &amp; "more" (in 1990-2000).') == \
        ["He", "paid", "$", "3.5", ",", "not", "1,000", "&", '"', "more", '"', "(", "in", "1990", "-",
         "2000", ")", "."]
    assert tokenize_13a("well-known U.S. it's") == ["well-known", "U", ".", "S", ".", "it's"]
    assert tokenize_13a("line-\nbreak <skipped> &amp;lt; &amp;quot;") == ["linebreak", "<", "&", "quot", ";"]


FRAGMENTS = ("&amp;", "&quot;", "&amp;quot;", "&amp;lt;", "&lt;", "&gt;", "&", "<skipped>", "-\n", "\n", " ", " ",
             "3.5", "1,000", "..", ".,", ",.", "-", "--", "9-", "'", "\t", "\u00a0", "\u2028", "\x85", "\u3000",
             "٣.٤", "你好", "мир")


def random_text(rng):
    parts = []
    for _ in range(rng.randint(0, 30)):
        r = rng.random()
        if r < 0.4:
            parts.append(rng.choice(FRAGMENTS))
        elif r < 0.8:
            parts.append(chr(rng.randint(0x20, 0x7e)))  # ASCII punctuation, digits, letters
        else:
            c = rng.randint(0, 0x10FFFF)
            parts.append(chr(c) if not 0xD800 <= c <= 0xDFFF else "?")  # any Unicode but lone surrogates
    return "".join(parts)


def test_tokenize_13a_matches_sacrebleu_on_random_strings():
    rng, tok = random.Random(0), Tokenizer13a()
    for _ in range(3000):
        text = random_text(rng)
        assert tokenize_13a(text) == tok(text).split(), repr(text)


# ---- Chinese: sacrebleu's 'zh' tokenization, chosen when a reference contains Chinese

def test_tokenize_zh_matches_sacrebleu_on_random_strings_and_every_character():
    rng, tok = random.Random(1), TokenizerZh()
    for _ in range(3000):
        text = random_text(rng)
        assert tokenize_zh(text) == tok(text).split(), repr(text)
    # each character between two letters, all of the first three planes: the split set is exact
    chars = (chr(c) for c in range(0x20, 0x30000) if not 0xD800 <= c <= 0xDFFF)
    assert [c for c in chars if tokenize_zh(f"a{c}b") != tok(f"a{c}b").split()] == []


def chinese_corpus(seed, noise, n=250):
    """Chinese sentences (no spaces between words), some with English, digits and punctuation mixed in."""
    rng = random.Random(seed)
    words = ("我们", "今天", "天气", "很好", "你好", "世界", "名字", "小明", "学习", "中文", "，", "。", "？",
             "“", "”", "—", "3.5", "GPU", "ok")
    refs = ["".join(rng.choice(words) for _ in range(rng.randint(2, 20))) for _ in range(n)]
    hyps = ["".join(w if rng.random() > noise else rng.choice(words) for w in rng.sample(r, len(r)) if rng.random() > noise / 3)
            if rng.random() < 0.8 else r for r in refs]
    return hyps, refs


@pytest.mark.parametrize("seed,noise", [(0, 0.1), (1, 0.4)])
def test_chinese_corpora_match_sacrebleu_zh(seed, noise):
    hyps, refs = chinese_corpus(seed, noise)
    ref = sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh")
    assert 0 < ref.score < 100
    assert abs(corpus_bleu(hyps, refs, tokenize="zh") - ref.score) <= 1e-9


def test_pick_tokenizer_takes_zh_for_chinese_references_where_13a_sees_whole_sentences():
    hyps, refs = chinese_corpus(2, 0.2)
    assert pick_tokenizer(refs) == "zh" and pick_tokenizer(["plain English.", "“quoted” — text"]) == "13a"
    # 13a finds almost no n-grams in text without spaces: only replies equal to the reference score
    assert corpus_bleu(hyps, refs, "zh") > corpus_bleu(hyps, refs, "13a") + 20
