"""
The built-in default data: small chat skills a tiny model can learn on a laptop CPU.

    python data/generate.py            # writes data/train.jsonl, data/val.jsonl, data/eval.jsonl

Every line is one conversation in the common chat format
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}
plus a "family" field naming the skill. The five families:

    recall  "My name is Alice." -> "Nice to meet you, Alice."  "What is my name?" -> "Your name is Alice."
    copy    "Repeat after me: blue river stone" -> "blue river stone"
    max     "Which is larger, 37 or 52?" -> "52"                      (integers 0-999)
    count   "How many words are in this sentence: the cat sat on the mat" -> "6"   (3-12 words)
    persona system "Your name is Kira."  "What is your name?" -> "My name is Kira."
            (the system message steers the answer: chat.py's /system shows it)

train.jsonl and val.jsonl hold whole conversations (val is for the validation loss). eval.jsonl
holds held-out prompts (the conversation up to the last user turn) with the expected "answer".
NOTE: val and eval use values never seen in training: names from a separate list, number pairs,
word sequences and sentences that never occur in train.jsonl. A model only scores well on them
if it learned the skill rather than memorised the data.

Fixed seed: the same files on every machine.
"""

import argparse
import json
import os
import random

# ---------------------------------------------------------------------------------------------
# vocabularies: names are split into disjoint train / held-out lists

NAMES = """Alice Bob Carol David Emma Frank Grace Henry Irene Jack Karen Leo Maria Nathan Olivia Paul
Quinn Rachel Sam Tina Victor Wendy Xavier Yara Zoe Adam Bella Chris Diana Ethan Fiona George Hannah
Ivan Julia Kevin Laura Mike Nina Oscar Peter Rosa Steve Tara Uma Vera Will Amber Blake Clara Derek
Elena Felix Gina Hugo Iris James Kate Lucas Mona Noah Opal Pedro Ruby Simon Tess Ursula Vince Wade
Alma Boris Cindy Dante Edith Flora Glen Heidi Igor Jade Kyle Lena Marco Nora Omar Pia Reed Sara Theo
Ada Ben Cleo Dora Eli Faye Gus Hope Ian Joy Kai Lily Max Ned Ona Ray Sue Ted Val Wes Ava Bruno Cora
Dean Eva Finn Gwen Hal Isla Joel Kira Luke Mia Neil Otto Rex Sky Toby Una Viola Yusuf Zara""".split()
HELD_OUT_NAMES = """Beatrix Cyrus Delphine Evander Gideon Harriet Ingrid Jasper Katya Leander Mirela
Niamh Orla Percival Rosalind Sebastian Thaddeus Ulrich Wilhelmina Ximena Yvette Zebulon Anouk Bertram
Caspian Dagny Eloise Fabian Greta Horatio Ilse Jolene Kasimir Lorcan Magnus Nadia Ottilie Priya
Rupert Saoirse Tobias Undine Valentin Winona Yosef Zinnia Aurelio Brigid Cosima Desmond
Abigail Ambrose Anastasia Anselm Antonia Archibald Ariadne Augustin Aurora Barnaby Benedikt Bianca
Camille Cassius Cecilia Clement Constance Cornelius Dalia Damian Dorothea Eamon Edmund Elspeth Emeric
Esme Eugenia Ezekiel Florian Francesca Gabriel Genevieve Godfrey Griselda Gunnar Hamish Helena
Hildegard Ignatius Imogen Isadora Jemima Joaquin Juniper Kalinda Kieran Lavinia Leopold Lucinda
Lysander Marguerite Marisol Matthias Maximilian Meredith Mortimer Nathaniel Nicolette Octavia Oswin
Pandora Penelope Peregrine Philippa Quentin Raphael Reginald Rosamund Salvador Seraphina Severin
Silvestre Soren Stellan Sunniva Tamsin Theodora Tiberius Ulrike Valeria Vesna Wolfgang Xenia Yolanda
Zacharias Zofia Akira Amara Anand Arjun Ayesha Bongani Chiara Chidi Dariusz Dmitri Elif Emeka Farida
Fatima Giorgos Haruto Hamid Ilaria Ioana Jamal Jovana Kavya Kofi Lakshmi Leilani Mateus Mehmet Mirko
Nkechi Oksana Olamide Paloma Radu Rashid Rania Sakura Santiago Sanjay Sigrun Tadeusz Tariq Thandiwe
Usman Valentina Wanjiru Yasmin Yerlan Zainab Zoltan Agnieszka Alejandro Bartholomew Beatriz Bogdan
Carmela Cristobal Dietrich Esperanza Ferdinand Gwendolyn Hortense Ildiko Jorunn Katarzyna Ludovica
Mathilde Nikolai Ophelia Ptolemy Rosalia Stanislav Torvald Vladimir Wendeline Xiomara Ysolde Zenobia
Adelaide Alasdair Benedetta Cordelia Crispin Drusilla Evangeline Fenella Gervase Honoria Isidore
Jacinta Lucretia Mafalda Norberto Orlando Perpetua Quirina Rafferty Sabina Tancredi Umberto Venetia
Wilfred Yevgenia Zeferino Annika Bjorn Dunya Eirik Fridtjof Hedda Ingeborg Karolina Linnea Malin
Roswitha Solveig Tuva Vibeke Astrid""".split()
assert not set(NAMES) & set(HELD_OUT_NAMES) and len(set(HELD_OUT_NAMES)) == len(HELD_OUT_NAMES)

# Made-up names widen the training list so that recall has to copy the name from the conversation:
# with a few hundred names the model memorises them and fails on any name it has not seen. They
# use every letter in many patterns, so that unseen real names break into familiar pieces.
ONSETS = [""] * 4 + "b c d f g h j k l m n p q r s t v w x y z br ch cl dr fl gr kr pl sh st th tr".split()
VOWELS = "a e i o u y a e i o ia ea ou ai".split()
CODAS = [""] * 6 + "n r l s m d t x k st nd".split()


def made_up_names(n, seed=7):
    rng = random.Random(seed)
    out = set()
    while len(out) < n:
        syllables = rng.randint(1, 3)
        name = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables))
        name = (name + rng.choice(VOWELS) if rng.random() < 0.3 else name).capitalize()
        if name not in HELD_OUT_NAMES and len(name) >= 3:
            out.add(name)
    return sorted(out)


TRAIN_NAMES = NAMES + made_up_names(20000)

WORDS = """apple river stone blue green red cloud tree house bird fish moon sun star rain snow wind
fire water light dark happy small big fast slow cold warm old new bright quiet loud soft hard sweet
bread milk cheese door window chair table book paper pen cup plate spoon road hill lake sea sand
leaf root seed flower grass forest garden field farm horse cow dog cat mouse lion tiger bear wolf fox
owl frog king queen child friend teacher doctor city town village castle bridge tower boat ship train
car bike song dance game story dream heart hand foot eye ear nose mouth hair gold silver iron glass
wood rock clay salt sugar honey lemon orange grape plum cherry pear corn rice bean soup tea coffee
morning night evening summer winter spring autumn storm thunder mountain valley island desert ocean
north south east west left right up down near far open close early late always never often sometimes
the a an my your his her our their this that these those one two three many few some every each
jump run walk sing read write draw paint swim fly climb sleep eat drink cook build find keep give
take make see hear feel know think""".split()
COUNT_SUBJECTS = "the cat|a dog|my friend|the old man|our teacher|a small bird|the girl|his brother".split("|")
COUNT_VERBS = "sat|ran|jumped|slept|sang|walked|waited|smiled|looked|played".split("|")
COUNT_TAIL = "on the mat|in the park|near the river|under a big tree|at home|with her dog|all day long|by the old red door|today|quietly".split("|")


def system(text):
    return {"role": "system", "content": text}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------------------------------------
# one function per family: (rng, names) -> (messages, key). The key identifies the example's
# values, so that held-out sets can exclude everything training has seen.

def make_recall(rng, names):
    name = rng.choice(names)
    msgs = [user(f"My name is {name}."), assistant(f"Nice to meet you, {name}."),
            user("What is my name?"), assistant(f"Your name is {name}.")]
    return msgs, name


def make_copy(rng, names):
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
    return [user(f"Repeat after me: {words}"), assistant(words)], words


def make_max(rng, names):
    a, b = rng.sample(range(1000), 2)
    return [user(f"Which is larger, {a} or {b}?"), assistant(str(max(a, b)))], (a, b)


def make_count(rng, names):
    n = rng.randint(3, 12)
    if rng.random() < 0.5:  # a natural sentence, trimmed or padded to n words
        words = f"{rng.choice(COUNT_SUBJECTS)} {rng.choice(COUNT_VERBS)} {rng.choice(COUNT_TAIL)}".split()
    else:
        words = []
    while len(words) < n:
        words.append(rng.choice(WORDS))
    sentence = " ".join(words[:n])
    return [user(f"How many words are in this sentence: {sentence}"), assistant(str(n))], sentence


def make_persona(rng, names):
    name = rng.choice(names)
    return [system(f"Your name is {name}."), user("What is your name?"), assistant(f"My name is {name}.")], name


FAMILIES = {"recall": make_recall, "copy": make_copy, "max": make_max, "count": make_count, "persona": make_persona}
# harder skills get a bigger share of the training data
TRAIN_WEIGHTS = {"recall": 0.23, "copy": 0.14, "max": 0.28, "count": 0.27, "persona": 0.08}


def generate(n_train, n_val, n_eval, seed=1337, eval_seed=None):
    """Returns (train, val, eval) lists of records. val/eval never share a key with train.
    eval_seed: draw val/eval from their own seed (the same train set, other held-out prompts)."""
    rng = random.Random(seed)
    families, weights = list(TRAIN_WEIGHTS), list(TRAIN_WEIGHTS.values())
    train, seen = [], set()
    for _ in range(n_train):
        family = rng.choices(families, weights)[0]
        msgs, key = FAMILIES[family](rng, TRAIN_NAMES)
        train.append({"family": family, "messages": msgs})
        seen.add((family, key))

    def held_out(n_per_family):
        out, used = [], set()
        for family, make in FAMILIES.items():
            while sum(r["family"] == family for r in out) < n_per_family:
                msgs, key = make(rng, HELD_OUT_NAMES)
                if (family, key) in seen or (family, key) in used:
                    continue  # fresh values only, each once (held-out names never occur in training)
                used.add((family, key))
                out.append({"family": family, "messages": msgs})
        rng.shuffle(out)
        return out

    if eval_seed is not None:
        rng = random.Random(eval_seed)
    val = held_out(n_val // len(FAMILIES))
    evals = [{"family": r["family"], "messages": r["messages"][:-1], "answer": r["messages"][-1]["content"]}
             for r in held_out(n_eval // len(FAMILIES))]
    return train, val, evals


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--out", default=here, help="directory for train/val/eval.jsonl")
    p.add_argument("--n-train", type=int, default=200000)  # ~1,230 steps of 16 packed rows
    p.add_argument("--n-val", type=int, default=1000)
    p.add_argument("--n-eval", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--eval-seed", type=int, default=None,
                   help="fresh held-out prompts for the same training set (e.g. to re-measure a trained run)")
    args = p.parse_args()
    train, val, evals = generate(args.n_train, args.n_val, args.n_eval, args.seed, args.eval_seed)
    os.makedirs(args.out, exist_ok=True)
    for name, records in (("train", train), ("val", val), ("eval", evals)):
        write_jsonl(os.path.join(args.out, f"{name}.jsonl"), records)
    print(f"wrote {len(train)} train, {len(val)} val, {len(evals)} eval conversations to {args.out}")
