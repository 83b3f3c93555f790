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
