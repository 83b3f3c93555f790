"""
The built-in default data: small chat skills a tiny model can learn on a laptop CPU.

    python data/generate.py            # writes data/train.jsonl, data/val.jsonl, data/eval.jsonl

Every line is one conversation in the common chat format
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}
plus a "family" field naming the skill. The six families:

    recall    "My name is Alice." -> "Nice to meet you, Alice."  "What is my name?" -> "Your name is Alice."
    recall_zh "我叫张伟。" -> "你好，张伟。"  "我叫什么名字？" -> "你叫张伟。"   (the same skill in Chinese)
    copy      "Repeat after me: blue river stone" -> "blue river stone"            (3-12 words)
    count     "How many words are in this sentence: the cat sat on the mat" -> "6"  (3-12 words)
    max       "Which is larger, 37 or 52?" -> "52"                                 (integers 0-999)
    persona   system "Your name is Kira."  "What is your name?" -> "My name is Kira."
              (the system message steers the answer: chat.py's /system shows it)

and skills the default data leaves out, for teaching a trained model something new
(`make lora-demo`; `--families min` writes its files):

    min       "Which is smaller, 37 or 52?" -> "37"
    last      "What is the last word of: blue river stone" -> "stone"

The skills are taught, not the lists: a model that memorised its words or names would fail on the
held-out prompts, because those use only words and names the training data never contains.
  - copy and count draw from ~200 everyday words, 20,000 made-up words and random letter strings;
    held out are ~330 other dictionary words and made-up words training never uses.
  - recall and persona train on 130 common names and 20,000 made-up ones; held out are 254 others.
  - recall_zh holds out Chinese names (a surname and a two-character given name) training never uses.
  - max holds out number pairs training never asks about.

train.jsonl and val.jsonl hold whole conversations (val is for the validation loss). eval.jsonl
holds held-out prompts (the conversation up to the last user turn) with the expected "answer".
Fixed seed: the same files on every machine.
"""

import argparse
import json
import os
import random

# ---------------------------------------------------------------------------------------------
# names: split into disjoint train / held-out lists

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

# Made-up names and words widen the training lists, so that a skill has to read its value from the
# conversation: with a few hundred names the model memorises them and fails on any name it has not
# seen. The syllables use every letter in many patterns, so that unseen words break into familiar pieces.
ONSETS = [""] * 4 + "b c d f g h j k l m n p q r s t v w x y z br ch cl dr fl gr kr pl sh st th tr".split()
VOWELS = "a e i o u y a e i o ia ea ou ai".split()
CODAS = [""] * 6 + "n r l s m d t x k st nd".split()


def made_up_words(n, seed, exclude=()):
    """n distinct lowercase words of 1-3 made-up syllables (mostly 1-2: short words, short rows)."""
    rng, out, exclude = random.Random(seed), set(), set(w.lower() for w in exclude)
    while len(out) < n:
        word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(rng.choice((1, 1, 2, 2, 3))))
        word = word + rng.choice(VOWELS) if rng.random() < 0.3 else word
        if len(word) >= 3 and word not in exclude:
            out.add(word)
    return sorted(out)


TRAIN_NAMES = NAMES + [w.capitalize() for w in made_up_words(20000, seed=7, exclude=HELD_OUT_NAMES)]

# ---------------------------------------------------------------------------------------------
# words for copy and count

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
HELD_OUT_WORDS = """absence acorn admiral agenda alarm album alley anchor angle ankle anthem apron arch arena
armor arrow artist atlas attic avenue badge bakery balcony bamboo banner barrel basket battery beacon
beetle bench berry blanket blossom blunder bonnet border bottle boulder bracket branch breeze brick
bubble bucket buckle budget buffalo bundle butter button cabin cactus camera canal candle canyon
carpet carrot cattle cellar cement chapter charcoal cherub chimney circle circus citizen clover
coconut collar comet compass copper cottage cotton cradle crater crayon cricket crown crystal
cushion custom dagger daisy debate decade dentist diamond diary dinner dolphin donkey dragon
drawer eagle echo eclipse elbow engine envelope falcon fabric feather fence festival fiddle
finger flannel flute fossil fountain freckle gadget galaxy garlic gazelle giant ginger glacier
globe glove goblet gravel guitar hammer harbor harvest hatchet helmet hermit hollow hornet
hunger husband iceberg igloo infant insect jacket jelly jigsaw journal jungle kettle kitten
ladder lantern laundry legend lentil lettuce library lizard lobster locket magnet mammal
mango marble market meadow medal melody mirror mitten monkey mosaic muffin museum mustard
napkin needle nephew nickel noodle number nutmeg oatmeal octopus olive onion orchard oyster
paddle palace pancake panther parade parcel parrot pebble pepper pickle pigeon pillow pilot
pirate planet pocket poem potato prairie pretzel puddle pumpkin puppet puzzle quarrel quill
rabbit radish raisin ribbon riddle rocket saddle sailor salmon saucer scarf scissors shadow
shelter shovel signal silence sister skeleton sleeve slipper spider spinach squirrel stable
statue sticker stomach stripe summit sweater syrup tablet tadpole tangle target teapot temple
thimble thistle ticket timber toaster tomato tongue trumpet tulip tunnel turtle umbrella uncle
valley velvet violin voyage waffle wagon walnut walrus wardrobe weasel whistle wizard yogurt
zebra zipper brave clever gentle humble jolly lively narrow polite proud rusty shiny silly
tender wicked wooden yellow purple scarlet crimson golden hungry sleepy clumsy dusty fuzzy
gather wander whisper borrow follow wonder listen travel answer gallop juggle shiver sneeze
tumble wiggle yawn breathe chase collect deliver explore imagine mumble paddle scribble""".split()
HELD_OUT_WORDS = sorted(set(HELD_OUT_WORDS) - set(WORDS))
MADE_UP_WORDS = made_up_words(20000, seed=11, exclude=HELD_OUT_WORDS + WORDS + HELD_OUT_NAMES)
HELD_OUT_MADE_UP = made_up_words(2000, seed=12, exclude=HELD_OUT_WORDS + WORDS + MADE_UP_WORDS + HELD_OUT_NAMES)
HELD_OUT = set(HELD_OUT_WORDS + HELD_OUT_MADE_UP)
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def train_word(rng):
    """An everyday word, a made-up word or a random letter string, sometimes capitalised."""
    r = rng.random()
    if r < 0.3:
        word = rng.choice(WORDS)
    elif r < 0.92:
        word = rng.choice(MADE_UP_WORDS)
    else:  # never by chance a held-out word
        while (word := "".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 9)))) in HELD_OUT:
            pass
    return word.capitalize() if rng.random() < 0.1 else word


def held_out_word(rng):
    """A dictionary word or a made-up word that training never uses."""
    return rng.choice(HELD_OUT_WORDS if rng.random() < 0.5 else HELD_OUT_MADE_UP)


COUNT_SUBJECTS = "the cat|a dog|my friend|the old man|our teacher|a small bird|the girl|his brother".split("|")
COUNT_VERBS = "sat|ran|jumped|slept|sang|walked|waited|smiled|looked|played".split("|")
COUNT_TAIL = "on the mat|in the park|near the river|under a big tree|at home|with her dog|all day long|by the old red door|today|quietly".split("|")


# ---------------------------------------------------------------------------------------------
# Chinese names: a surname and a one- or two-character given name. Held-out names are combinations
# training never uses, always with a two-character given name.

SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦方白邹孟熊秦邱江尹薛段雷侯龙史陶黎贺顾毛郝龚邵万钱严武戴莫孔向汤"
GIVEN = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华玉兰萍红鹏辉建国文斌宇浩凯晨鑫博雪梅琳晶欣怡佳嘉轩涵睿思雨泽昊天一诗悦彤萱琪瑶淑慧婷倩颖露丹宁亮俊峰飞鸿翔志成坤健彬"


def zh_name(rng, held_out):
    return rng.choice(SURNAMES) + "".join(rng.choices(GIVEN, k=2 if held_out else rng.randint(1, 2)))


def system(text):
    return {"role": "system", "content": text}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------------------------------------
# one function per family: (rng, held_out) -> (messages, key). held_out: draw words and names from
# the held-out lists. The key identifies the example's values, so that held-out sets can exclude
# everything training has seen.

def make_recall(rng, held_out):
    name = rng.choice(HELD_OUT_NAMES if held_out else TRAIN_NAMES)
    msgs = [user(f"My name is {name}."), assistant(f"Nice to meet you, {name}."),
            user("What is my name?"), assistant(f"Your name is {name}.")]
    return msgs, name


def make_recall_zh(rng, held_out):
    name = zh_name(rng, held_out)
    msgs = [user(f"我叫{name}。"), assistant(f"你好，{name}。"), user("我叫什么名字？"), assistant(f"你叫{name}。")]
    return msgs, name


def words(rng, held_out, n):
    return [held_out_word(rng) if held_out else train_word(rng) for _ in range(n)]


def sentence_length(rng, held_out):
    """3-12 words. Training draws a sentence of n words n times as often as uniform would: long ones
    are where copy and count slip (a repeated piece, an off-by-one), short ones are learnt early.
    Held-out prompts stay uniform."""
    return rng.randint(3, 12) if held_out else rng.choices(range(3, 13), weights=range(3, 13))[0]


def make_copy(rng, held_out):
    text = " ".join(words(rng, held_out, sentence_length(rng, held_out)))
    return [user(f"Repeat after me: {text}"), assistant(text)], text


def make_count(rng, held_out):
    n = sentence_length(rng, held_out)
    if not held_out and rng.random() < 0.3:  # a natural sentence, trimmed or padded to n words
        start = f"{rng.choice(COUNT_SUBJECTS)} {rng.choice(COUNT_VERBS)} {rng.choice(COUNT_TAIL)}".split()[:n]
    else:
        start = []
    sentence = " ".join(start + words(rng, held_out, n - len(start)))
    return [user(f"How many words are in this sentence: {sentence}"), assistant(str(n))], sentence


def make_max(rng, held_out):
    a, b = rng.sample(range(1000), 2)
    return [user(f"Which is larger, {a} or {b}?"), assistant(str(max(a, b)))], (a, b)


def make_persona(rng, held_out):
    name = rng.choice(HELD_OUT_NAMES if held_out else TRAIN_NAMES)
    return [system(f"Your name is {name}."), user("What is your name?"), assistant(f"My name is {name}.")], name


def make_min(rng, held_out):
    a, b = rng.sample(range(1000), 2)
    return [user(f"Which is smaller, {a} or {b}?"), assistant(str(min(a, b)))], (a, b)


def make_last(rng, held_out):
    text = words(rng, held_out, sentence_length(rng, held_out))
    return [user(f"What is the last word of: {' '.join(text)}"), assistant(text[-1])], " ".join(text)


FAMILIES = {"recall": make_recall, "recall_zh": make_recall_zh, "copy": make_copy, "count": make_count,
            "max": make_max, "persona": make_persona}
# skills the default data does not teach: a trained model learns them later (`make lora-demo`)
NEW_FAMILIES = {"min": make_min, "last": make_last}
# Harder skills get a bigger share of the training data. count's answer is one or two tokens, so
# its conversations weigh little in the loss however many there are: it gets the most of them.
TRAIN_WEIGHTS = {"recall": 0.02, "recall_zh": 0.03, "copy": 0.32, "count": 0.40, "max": 0.21, "persona": 0.02}


def generate(n_train, n_val, n_eval, seed=1337, eval_seed=None, only=None, instead=None):
    """Returns (train, val, eval) lists of records. val/eval never share a key with train, and their
    words and names come from the held-out lists.
    eval_seed: draw val/eval from their own seed (the same train set, other held-out prompts).
    only: these families alone, in equal shares (NEW_FAMILIES' too).
    instead: {family: maker} replacing a family's maker (the noisy-teacher data's max)."""
    rng = random.Random(seed)
    makers = {**FAMILIES, **NEW_FAMILIES}
    chosen = {**({f: makers[f] for f in only} if only else FAMILIES), **(instead or {})}
    families, weights = (list(chosen), [1] * len(chosen)) if only else (list(TRAIN_WEIGHTS), list(TRAIN_WEIGHTS.values()))
    train, seen = [], set()
    for _ in range(n_train):
        family = rng.choices(families, weights)[0]
        msgs, key = chosen[family](rng, held_out=False)
        train.append({"family": family, "messages": msgs, "key": key})
        seen.add((family, key))

    def held_out(n_per_family):
        out, used = [], set()
        for family, make in chosen.items():
            while sum(r["family"] == family for r in out) < n_per_family:
                msgs, key = make(rng, held_out=True)
                if (family, key) in seen or (family, key) in used:
                    continue  # fresh values only, each once
                used.add((family, key))
                out.append({"family": family, "messages": msgs})
        rng.shuffle(out)
        return out

    if eval_seed is not None:
        rng = random.Random(eval_seed)
    val = held_out(n_val // len(chosen))
    evals = [{"family": r["family"], "messages": r["messages"][:-1], "answer": r["messages"][-1]["content"]}
             for r in held_out(n_eval // len(chosen))]
    for r in train:
        del r["key"]
    return train, val, evals


# ---------------------------------------------------------------------------------------------
# A noisy teacher and preference pairs, for `make align` (reward model and DPO after SFT). The SFT
# data's max answers come from a teacher with a blind spot: on a close call (both numbers in the
# same hundred, 437 or 452) it does not answer ("They are about the same."). Close calls are ~30%
# of the max prompts here (uniform draws make 10% of them), so ~30% of the teacher's max answers
# are wrong, and the SFT model, learning the blind spot, dodges the same share of held-out
# prompts however long it trains. Preference pairs (preference_pairs: the right reply chosen, a
# wrong one rejected, the teacher's dodge among them; half of them on max prompts) are what can
# fix it: a reward model learns to tell right from wrong, and DPO moves the SFT model towards the
# chosen replies.

DODGE = "They are about the same."
CLOSE_CALLS = 0.22  # drawn as close calls; a tenth of the others are close by chance: ~30% in all


def close_call(a, b):
    return a // 100 == b // 100


def max_pair(rng):
    """Two numbers to compare, a close call ~30% of the time."""
    if rng.random() < CLOSE_CALLS:
        hundred = 100 * rng.randrange(10)
        return tuple(rng.sample(range(hundred, hundred + 100), 2))
    return tuple(rng.sample(range(1000), 2))


def make_max_close_calls(rng, held_out):
    a, b = max_pair(rng)
    return [user(f"Which is larger, {a} or {b}?"), assistant(str(max(a, b)))], (a, b)


def compared(text):
    """ "Which is larger, 37 or 52?" -> (37, 52)"""
    a, b = text.removeprefix("Which is larger, ").removesuffix("?").split(" or ")
    return int(a), int(b)


def noisy_teacher(record):
    """A max conversation as the teacher answers it: no answer on a close call."""
    if close_call(*compared(record["messages"][0]["content"])):
        record["messages"][-1]["content"] = DODGE
    return record


def near_miss(family, reply, key, rng):
    """A wrong reply for a pair's rejected side: for max, the teacher's dodge on a close call and
    the other number otherwise; a count off by 3-6, another sentence for copy, another name (no
    character in common, for Chinese ones). (Off by one, one word left out, or a name differing in
    one character would be closer misses; a small reward model, which reads one vector at the
    reply's end, does not tell those apart.)"""
    if family == "max":
        return DODGE if close_call(*key) else str(min(key))
    if family == "count":
        n = int(reply)
        return str(n + rng.choice([d for d in (-6, -5, -4, -3, 3, 4, 5, 6) if n + d >= 1]))
    if family == "copy":
        while (other := make_copy(rng, held_out=False)[1]) == reply:
            pass
        return other
    while True:
        other = zh_name(rng, False) if family == "recall_zh" else rng.choice(TRAIN_NAMES)
        if (not set(other) & set(key)) if family == "recall_zh" else other != key:
            return reply.replace(key, other)


def preference_pairs(n, rng, exclude):
    """n preference pairs in TRL's conversational format, the right reply chosen and a wrong one
    rejected: half on max prompts (close calls ~30% of them, as in the noisy SFT data), the rest
    spread over the other families, so that what DPO learns about numbers from max (a larger one
    is better) is not all it learns about them. Each prompt once, none of `exclude` ((family, key)
    as the makers give them)."""
    out, used = [], set(exclude)
    others = [f for f in FAMILIES if f != "max"]
    while len(out) < n:
        family = "max" if len(out) % 2 == 0 else others[(len(out) // 2) % len(others)]
        msgs, key = (make_max_close_calls if family == "max" else FAMILIES[family])(rng, held_out=False)
        if (family, key) in used:
            continue
        used.add((family, key))
        reply = msgs[-1]["content"]
        out.append({"family": family, "prompt": msgs[:-1], "chosen": [assistant(reply)],
                    "rejected": [assistant(near_miss(family, reply, key, rng))]})
    return out


def max_prompts(n, rng, exclude):
    """n max chats (prompt and right answer) for GRPO, half of them close calls: the prompts the
    SFT model gets wrong. A prompt it always answers right teaches GRPO nothing (its group's rewards
    are all equal, so are its advantages: zero); at the SFT data's ~30% close calls, two thirds of
    the rollouts go to such prompts. Each once, none of `exclude` ((a, b) pairs; held-out ones are
    excluded in both orders)."""
    out, used = [], set(exclude)
    while len(out) < n:
        hundred = 100 * rng.randrange(10)
        a, b = rng.sample(range(hundred, hundred + 100) if len(out) % 2 == 0 else range(1000), 2)
        if (a, b) not in used:
            used.add((a, b))
            out.append({"family": "max", "messages": [user(f"Which is larger, {a} or {b}?"), assistant(str(max(a, b)))]})
    return out


def near_number(a, b, rng):
    """A number within 30 of the larger of a and b, neither of them."""
    while (x := max(a, b) + rng.choice([-1, 1]) * rng.randint(1, 30)) < 0 or x in (a, b):
        pass
    return str(x)


def mixed_digits(a, b, rng):
    """The two numbers' digits mixed, place by place (452 or 437 -> 432), neither of them; of numbers
    of different lengths, the larger with its last digit doubled (74 -> 744)."""
    big, small = str(max(a, b)), str(min(a, b))
    if len(big) == len(small):
        for _ in range(50):
            x = "".join(rng.choice(places) for places in zip(big, small))
            if x not in (big, small) and (len(x) == 1 or x[0] != "0"):
                return x
    return big + big[-1]


def other_number(a, b, rng):
    """Any number below 1000 but a and b."""
    while (x := rng.randrange(1000)) in (a, b):
        pass
    return str(x)


def max_pairs(prompts, rng):
    """Preference pairs for a reward model that has to check max answers digit by digit: on each of
    `prompts` (max_prompts' chats) the right answer over each of four wrong ones a policy writes
    once it stops dodging: the smaller number, a number near the larger, the two mixed, any other
    number. make align's pairs reject only the dodge and, on numbers far apart, the smaller one; a
    reward model trained on them alone ranks close calls about as well as a coin, and PPO finds
    that out (as it finds any wrong answer the pairs never reject: 132 or 120 -> 912)."""
    out = []
    for r in prompts:
        (a, b), right = compared(r["messages"][0]["content"]), r["messages"][1]
        for wrong in (str(min(a, b)), near_number(a, b, rng), mixed_digits(a, b, rng), other_number(a, b, rng)):
            out.append({"family": "max", "prompt": r["messages"][:1], "chosen": [right], "rejected": [assistant(wrong)]})
    return out


def generate_align(n_train, n_val, n_eval, n_pairs, n_val_pairs, seed=1337, n_max_pairs=16000):
    """-> {file name: records} for data/align/: the noisy-teacher SFT set (train, val, eval: the
    default families, max with close calls; val and eval answered right), preference pairs
    (pairs: for training, pairs_val: held out), whose prompts eval.jsonl never asks, and the
    training pairs' prompts with their right answers as chats (prompts), max prompts, half of them
    close calls (max_prompts: what GRPO and PPO answer), and four pairs on each of n_max_pairs more
    max prompts (max_pairs: with pairs, PPO's reward model's)."""
    train, val, evals = generate(n_train, n_val, n_eval, seed, instead={"max": make_max_close_calls})
    train = [noisy_teacher(r) if r["family"] == "max" else r for r in train]
    asked = {("max", compared(r["messages"][0]["content"])) for r in evals if r["family"] == "max"}
    pairs = preference_pairs(n_val_pairs + n_pairs, random.Random(seed + 1), asked)
    val_pairs, pairs = pairs[:n_val_pairs], pairs[n_val_pairs:]
    # the RL stages' prompts: the training pairs' prompts, each with its right answer, and max
    # prompts where the SFT model's mistakes are (what make ppo and make grpo answer)
    prompts = [{"family": p["family"], "messages": p["prompt"] + p["chosen"]} for p in pairs]
    unasked = {k for _, key in asked for k in (key, key[::-1])}
    hard = max_prompts(n_pairs, random.Random(seed + 2), unasked)
    # PPO's reward model: make align's pairs and four wrong answers to each of n_max_pairs more max prompts
    more = max_pairs(max_prompts(n_max_pairs, random.Random(seed + 3), unasked), random.Random(seed + 4))
    return {"train": train, "val": val, "eval": evals, "pairs": pairs, "pairs_val": val_pairs, "prompts": prompts,
            "max_prompts": hard, "max_pairs": more}


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--out", default=None, help="directory for train/val/eval.jsonl (default data/, with --align data/align/)")
    p.add_argument("--n-train", type=int, default=76000)  # ~730 steps of 16 packed rows: ~3.5 min on 2 cores
    p.add_argument("--n-val", type=int, default=1200)
    p.add_argument("--n-eval", type=int, default=1200)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--eval-seed", type=int, default=None,
                   help="fresh held-out prompts for the same training set (e.g. to re-measure a trained run)")
    p.add_argument("--align", action="store_true", help="the noisy-teacher SFT set and preference pairs of "
                   "`make align` instead (train, val, eval, pairs, pairs_val, prompts, max_prompts, max_pairs.jsonl)")
    p.add_argument("--n-pairs", type=int, default=3000, help="with --align: training preference pairs")
    p.add_argument("--n-val-pairs", type=int, default=400, help="with --align: held-out preference pairs")
    p.add_argument("--n-max-pairs", type=int, default=16000, help="with --align: max prompts for max_pairs.jsonl "
                   "(four pairs each)")
    p.add_argument("--families", default="", help=f"comma-separated: only these skills (of {', '.join(FAMILIES)}, "
                   f"and the new {', '.join(NEW_FAMILIES)})")
    args = p.parse_args()
    only = [f for f in args.families.split(",") if f]
    unknown = [f for f in only if f not in FAMILIES and f not in NEW_FAMILIES]
    if unknown:
        p.error(f"--families: unknown skill {unknown[0]!r}")
    if args.align and (only or args.eval_seed is not None):
        p.error("--align writes its own families and held-out prompts: no --families or --eval-seed with it")
    args.out = args.out or (os.path.join(here, "align") if args.align else here)
    if args.align:
        files = generate_align(args.n_train, args.n_val, args.n_eval, args.n_pairs, args.n_val_pairs, args.seed,
                               args.n_max_pairs)
    else:
        files = dict(zip(("train", "val", "eval"), generate(args.n_train, args.n_val, args.n_eval, args.seed,
                                                            args.eval_seed, only)))
    os.makedirs(args.out, exist_ok=True)
    for name, records in files.items():
        write_jsonl(os.path.join(args.out, f"{name}.jsonl"), records)
    print("wrote " + ", ".join(f"{len(records)} {name}" for name, records in files.items()) + f" records to {args.out}")
