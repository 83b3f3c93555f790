"""
Tests for data/generate.py, the default data: the held-out prompts must measure skills, not
memory. Every word of a held-out copy or count prompt and every held-out name is absent from the
training conversations, and the answers are right.
"""

import re
import statistics

import pytest
from conftest import generate

import generate as g  # data/generate.py (conftest puts data/ on the path)


@pytest.fixture(scope="module")
def default_like():
    return generate(20000, 600, 600)


def train_text(train):
    return " ".join(m["content"] for r in train for m in r["messages"])


def test_six_families_each_held_out_equally(default_like):
    _, val, evals = default_like
    for held in (val, evals):
        counts = {f: sum(r["family"] == f for r in held) for f in g.FAMILIES}
        assert set(counts.values()) == {100}, counts


def test_held_out_copy_and_count_words_never_occur_in_training(default_like):
    train, val, evals = default_like
    seen = set(re.findall(r"[A-Za-z]+", train_text(train)))
    for r in val + [dict(e, messages=e["messages"] + [{"role": "assistant", "content": e["answer"]}]) for e in evals]:
        if r["family"] in ("copy", "count"):
            words = r["messages"][0]["content"].split(":", 1)[1].split()
            assert 3 <= len(words) <= 12 and not set(words) & seen, words
            answer = r["messages"][-1]["content"]
            assert answer == (" ".join(words) if r["family"] == "copy" else str(len(words)))
    # some held-out words are dictionary words, some made up
    held = {w for r in evals if r["family"] == "copy" for w in r["answer"].split()}
    assert held & set(g.HELD_OUT_WORDS) and held & set(g.HELD_OUT_MADE_UP)


def test_held_out_names_english_and_chinese_never_occur_in_training(default_like):
    train, _, evals = default_like
    text = train_text(train)
    for r in evals:
        if r["family"] in ("recall", "persona"):
            name = r["messages"][0]["content"].split("name is ")[1].rstrip(".")
            assert name in g.HELD_OUT_NAMES and not re.search(rf"\b{name}\b", text)
        if r["family"] == "recall_zh":
            name = r["answer"].removeprefix("你叫").removesuffix("。")
            assert len(name) == 3 and name not in text and r["messages"][-1]["content"] == "我叫什么名字？"


def test_max_answers_the_larger_number_of_a_pair_training_never_asked(default_like):
    train, _, evals = default_like
    asked = {r["messages"][0]["content"] for r in train if r["family"] == "max"}
    for r in (r for r in evals if r["family"] == "max"):
        a, b = map(int, re.findall(r"\d+", r["messages"][0]["content"]))
        assert r["answer"] == str(max(a, b)) and r["messages"][0]["content"] not in asked


def test_training_sentences_lean_long_and_held_out_ones_are_uniform(default_like):
    train, val, _ = default_like

    def lengths(records, family):
        return [len(r["messages"][0]["content"].split(":", 1)[1].split()) for r in records if r["family"] == family]
    for family in ("copy", "count"):
        trained, held = lengths(train, family), lengths(val, family)
        assert set(trained) == set(held) == set(range(3, 13))
        # n words with weight n: mean sum(n^2) / sum(n) = 645 / 75 = 8.6 words; uniform: 7.5
        assert abs(statistics.mean(trained) - 8.6) < 0.15 and abs(statistics.mean(held) - 7.5) < 0.8


def test_same_seed_same_files():
    assert generate(300, 60, 60) == generate(300, 60, 60)


# -----------------------------------------------------------------------------
# make align's data: a noisy teacher and preference pairs

@pytest.fixture(scope="module")
def align():
    return g.generate_align(20000, 300, 600, 1000, 200, n_max_pairs=2000)


def test_the_noisy_teacher_dodges_close_calls_only_about_30_percent_of_max(align):
    train = [r for r in align["train"] if r["family"] == "max"]
    wrong = 0
    for r in train:
        a, b = map(int, re.findall(r"\d+", r["messages"][0]["content"]))
        close = a // 100 == b // 100
        assert r["messages"][-1]["content"] == (g.DODGE if close else str(max(a, b)))
        wrong += close
    assert 0.27 < wrong / len(train) < 0.33
    for r in align["eval"]:  # held-out prompts keep the right answers
        if r["family"] == "max":
            assert r["answer"] == str(max(map(int, re.findall(r"\d+", r["messages"][0]["content"]))))
    others = {f: [r for r in align["train"] if r["family"] == f] for f in ("copy", "count")}
    assert all(r["messages"][-1]["content"] == r["messages"][0]["content"].split(": ", 1)[1] for r in others["copy"])


def test_preference_pairs_choose_the_right_reply_and_never_ask_a_held_out_prompt(align):
    pairs, held = align["pairs"], align["pairs_val"]
    assert sum(p["family"] == "max" for p in pairs) == len(pairs) // 2
    prompts = [json_key(p) for p in pairs + held]
    assert len(set(prompts)) == len(prompts)  # each prompt once: the held-out pairs are new
    asked = {r["messages"][0]["content"] for r in align["eval"]}
    for p in pairs + held:
        assert p["chosen"] != p["rejected"] and p["prompt"][-1]["content"] not in asked
        if p["family"] == "max":
            a, b = map(int, re.findall(r"\d+", p["prompt"][0]["content"]))
            wrong = g.DODGE if a // 100 == b // 100 else str(min(a, b))  # the teacher's reply, or the other number
            assert p["chosen"][0]["content"] == str(max(a, b)) and p["rejected"][0]["content"] == wrong
        if p["family"] == "count":
            n = len(p["prompt"][0]["content"].split(":", 1)[1].split())
            assert p["chosen"][0]["content"] == str(n) and 3 <= abs(int(p["rejected"][0]["content"]) - n) <= 6


def test_grpos_max_prompts_are_half_close_calls_answered_right_and_never_held_out(align):
    asked = {r["messages"][0]["content"] for r in align["eval"]}
    prompts = [r["messages"][0]["content"] for r in align["max_prompts"]]
    assert len(set(prompts)) == len(prompts) == 1000 and not set(prompts) & asked
    close = 0
    for r in align["max_prompts"]:
        a, b = map(int, re.findall(r"\d+", r["messages"][0]["content"]))
        assert r["family"] == "max" and r["messages"][1]["content"] == str(max(a, b))
        close += a // 100 == b // 100
    assert 0.52 < close / len(prompts) < 0.6  # half drawn as close calls, a tenth of the rest by chance


def test_max_pairs_reject_the_smaller_a_near_a_mixed_and_any_other_number_on_new_prompts(align):
    """PPO's reward model's extra pairs: on each prompt the larger number over the smaller one, one
    within 30 of the larger, one mixing the two numbers' digits place by place (or, of numbers of
    different lengths, the larger one with its last digit doubled) and any other number."""
    asked = {r["messages"][0]["content"] for r in align["eval"]}
    pairs = align["max_pairs"]
    assert len(pairs) == 4 * 2000
    for i in range(0, len(pairs), 4):
        prompt = pairs[i]["prompt"][0]["content"]
        assert prompt not in asked and all(p["prompt"][0]["content"] == prompt for p in pairs[i:i + 4])
        a, b = map(int, re.findall(r"\d+", prompt))
        big, small = str(max(a, b)), str(min(a, b))
        assert all(p["family"] == "max" and p["chosen"][0]["content"] == big for p in pairs[i:i + 4])
        smaller, near, mixed, other = (p["rejected"][0]["content"] for p in pairs[i:i + 4])
        assert other not in (big, small) and 0 <= int(other) < 1000
        assert smaller == small and near not in (big, small) and 1 <= abs(int(near) - int(big)) <= 30
        assert mixed not in (big, small) and not (len(mixed) > 1 and mixed[0] == "0")
        if len(big) == len(small):
            assert all(d in (x, y) for d, x, y in zip(mixed, big, small))
        else:
            assert mixed == big + big[-1]
    assert len({p["prompt"][0]["content"] for p in pairs}) == 2000


def json_key(pair):
    return tuple(m["content"] for m in pair["prompt"])
