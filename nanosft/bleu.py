"""
Corpus BLEU (Papineni et al., 2002), the standard corpus-level score, written to match sacrebleu's
default `sacrebleu.corpus_bleu(hyps, [refs]).score` (13a tokenization, 'exp' smoothing, case kept).
evaluate.py calls corpus_bleu on generated replies against the reference answers.

Chinese has no spaces between words, so 13a sees a whole sentence as one token and BLEU degenerates
to exact match. sacrebleu's 'zh' tokenization (`tokenize="zh"`) makes each Chinese character a token
and treats the rest as 13a does; pick_tokenizer chooses it when a reference contains Chinese.

  p_n  = sum over sentences of clipped n-gram matches / sum over sentences of hypothesis n-grams,
         n = 1..4, clipped: an n-gram counts at most as often as it occurs in the reference
  BP   = 1 if c >= r else exp(1 - r / c)       c, r: hypothesis and reference tokens in the corpus
  BLEU = 100 * BP * exp((log p_1 + log p_2 + log p_3 + log p_4) / 4)

Sums run over the whole corpus before dividing (not a mean of sentence scores), so one short
sentence cannot dominate. The k-th order with zero matches gets p_n = 1 / (2^k * total_n) instead of
0 ('exp' smoothing, as in mteval). If no order matches at all, or some order has no n-grams at all
(every hypothesis shorter than n), the score is 0.
"""

import math
import re
import string
from collections import Counter

MAX_ORDER = 4

# undone one after another in this order, as mteval does: "&amp;lt;" becomes "<", "&amp;quot;" stays "&quot;"
ENTITIES = (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">"))
SYMBOLS = "".join(c for c in string.punctuation if c not in "'-.,")  # handled by the rules below
# Each rule is one left-to-right re.sub over the output of the previous one; what a match consumes
# decides cases like "a.,b", so they stay separate passes. [0-9], not \d: only ASCII digits keep
# numbers such as "3.5", "1,000" and "1990-2000" together.
RULES = (
    (re.compile("([" + re.escape(SYMBOLS) + "])"), r" \1 "),  # ASCII symbols except ' - . ,
    (re.compile(r"([^0-9])([.,])"), r"\1 \2 "),  # period or comma not after a digit
    (re.compile(r"([.,])([^0-9])"), r" \1 \2"),  # period or comma not before a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # a dash after a digit
)


def tokenize_13a(text):
    """The mteval-v13a tokenization (sacrebleu's default '13a') -> list of tokens."""
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in ENTITIES:
        text = text.replace(entity, char)
    text = f" {text} "  # so punctuation at either end has a neighbour for the rules to see
    for pattern, replacement in RULES:
        text = pattern.sub(replacement, text)
    return text.split()


# The characters sacrebleu's 'zh' tokenizer splits off: CJK ideographs, radicals, strokes, CJK and
# full-width punctuation. Two of its ranges are written there as "\u20000".."\u2a6d6" and
# "\u2f800".."\u2fa1d" (meant as ideograph extension B and the compatibility supplement); Python
# reads those as two-character strings, so for one character they mean U+2001..U+2A6D (general
# punctuation, arrows, math symbols: the dash "—" and curly quotes included) and U+2F81..U+2FA1.
# What it does is what we match; U+20000 and up stay with 13a's rules.
ZH_SPLIT = re.compile("([\u2001-\u2a6d\u2e80-\u2eff\u2f00-\u2fdf\u2ff0-\u2fff\u3000-\u303f\u3100-\u312f"
                      "\u31a0-\u31bf\u31c0-\u31ef\u3200-\u33ff\u3400-\u4db5\u4e00-\u9fbb\uf900-\ufa2d"
                      "\ufa30-\ufa6a\ufa70-\ufad9\ufe10-\ufe1f\ufe30-\ufe4f\uff00-\uffef])")
HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")  # Chinese characters


def tokenize_zh(text):
    """sacrebleu's 'zh' tokenization -> list of tokens: each character of ZH_SPLIT on its own, then
    13a's punctuation rules (without 13a's newline and entity handling, as there)."""
    text = ZH_SPLIT.sub(r" \1 ", text.strip())
    for pattern, replacement in RULES:
        text = pattern.sub(replacement, text)
    return text.split()


TOKENIZERS = {"13a": tokenize_13a, "zh": tokenize_zh}


def pick_tokenizer(references):
    """'zh' when any reference contains a Han character (Chinese, or Japanese kanji), else
    sacrebleu's default '13a'."""
    return "zh" if any(HAN.search(r) for r in references) else "13a"


def ngrams(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu_from_counts(matches, totals, hyp_len, ref_len):
    """Score (0-100) from corpus sums: matches[n-1], totals[n-1] for each order n, and lengths."""
    # an order with no n-grams has an undefined precision; sacrebleu takes it as log 0, i.e. score 0
    if not any(matches) or not all(totals):
        return 0.0
    log_sum, halvings = 0.0, 0
    for m, t in zip(matches, totals):
        if m == 0:  # 'exp' smoothing: each further zero-match order gets half the previous credit
            halvings += 1
            m = 0.5 ** halvings
        log_sum += math.log(m / t)
    bp = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * bp * math.exp(log_sum / MAX_ORDER)


def corpus_bleu(hypotheses, references, tokenize="13a"):
    """BLEU (0-100) of hypotheses[i] against the single reference references[i]; tokenize: a name
    in TOKENIZERS (sacrebleu's `tokenize` argument)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"corpus_bleu needs one reference per hypothesis, "
                         f"got {len(hypotheses)} hypotheses and {len(references)} references")
    split = TOKENIZERS[tokenize]
    matches, totals = [0] * MAX_ORDER, [0] * MAX_ORDER
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references):
        # trailing whitespace goes first (sacrebleu does this), so a final "-\n" is kept as "-"
        hyp, ref = split(hyp.rstrip()), split(ref.rstrip())
        hyp_len, ref_len = hyp_len + len(hyp), ref_len + len(ref)
        for n in range(1, MAX_ORDER + 1):
            h = ngrams(hyp, n)
            matches[n - 1] += sum((h & ngrams(ref, n)).values())  # & keeps the smaller count: clipping
            totals[n - 1] += sum(h.values())
    return bleu_from_counts(matches, totals, hyp_len, ref_len)
