"""
Training data: files -> validated conversations -> (ids, loss mask) -> packed rows -> batches.

    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}

formats.py reads the formats users have (this one, ShareGPT, Alpaca, DeepSpeed-Chat, plain text)
into conversations like the one above. Every record that is wrong is reported as "file:line:
reason" and stops the run, or with --skip-invalid is left out and counted (nothing is dropped in
silence). Conversations are rendered by template.py (a conversation too long for a row loses its
oldest whole exchanges), then packed: several whole conversations share one fixed-length row, and each
token carries its conversation's index in the row (`doc`) and its position inside that
conversation (`pos`). The model uses `doc` to keep attention inside each conversation and `pos`
to restart rotary positions, so a packed row trains exactly like separate padded rows, without
paying for the padding. Rows are re-packed from a fresh shuffle every epoch.

Rows are `row_len` = max_seq_len + 1 tokens long: inputs and targets are the row shifted by one.
train.py reads its files through cache.py, which keeps the rendered samples of each file so that
a rerun skips all of this; `python -m nanosft.data check|stats` (cli.py) runs the validation alone.
"""

import random

import numpy as np
import torch

from nanosft.formats import UNREADABLE, FormatError, read_records, read_text, to_messages, to_pair
from nanosft.template import ROLES


# -----------------------------------------------------------------------------
# reading and validating

def _check_messages(rec):
    """Reason why rec["messages"] is not a list of {"role", "content"} messages, or None."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type(rec).__name__}"
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return 'missing "messages" (a non-empty list of {"role", "content"} objects)'
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            return f"messages[{i}] is not an object"
        if m.get("role") not in ROLES:
            return f"messages[{i}] has role {m.get('role')!r}; expected one of {', '.join(ROLES)}"
        if not isinstance(m.get("content"), str):
            return f"messages[{i}] content is not a string"
    return None


def check_conversation(rec):
    """Validator for training data: every assistant turn says something, and the conversation ends
    with one (a trailing user turn would be a question nobody answers: nothing to learn from it)."""
    reason = _check_messages(rec)
    if reason is None:
        msgs = rec["messages"]
        empty = [i for i, m in enumerate(msgs) if m["role"] == "assistant" and not m["content"].strip()]
        if empty:
            reason = f"messages[{empty[0]}] is an empty assistant turn"
        elif msgs[-1]["role"] != "assistant":
            reason = f"the conversation ends with a {msgs[-1]['role']} turn, not an assistant turn"
    return reason


def check_prompt(rec):
    """Validator for prompts (chat.py --batch, evaluation): messages ending with a user turn."""
    reason = _check_messages(rec)
    if reason is None and rec["messages"][-1]["role"] != "user":
        reason = "the last message must be a user turn (it is what the model answers)"
    return reason


def error_list(path, errors):
    shown = "\n  ".join(errors[:20])
    more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
    return f"{len(errors)} bad line(s) in {path}:\n  {shown}{more}"


def read_file(path, check, convert=None, skip_invalid=False, reader=read_records):
    """-> (records, errors): the records that pass `check` (after `convert`, which may raise
    FormatError), and "path:line: reason" for every one that does not. Unless skip_invalid, any
    error raises ValueError listing them (the first 20 shown, all counted); so does, even with
    skip_invalid, an error after which the file cannot be read on (the records after it would be
    lost without being counted)."""
    records, errors = [], []
    for lineno, rec, reason in reader(path):
        if reason is None:
            try:
                rec = convert(rec) if convert else rec
                reason = check(rec)
            except FormatError as e:
                reason = str(e)
        if reason:
            errors.append(f"{path}:{lineno}: {reason}")
        else:
            records.append(rec)
    if errors and (not skip_invalid or errors[-1].endswith(UNREADABLE)):
        raise ValueError(error_list(path, errors))
    return records, errors


def load_conversations(path, fmt="auto", skip_invalid=False):
    """Training conversations from a file in any format of formats.py -> (records, errors), each
    record {"messages": [...], "format": name}."""
    def convert(rec):
        msgs, found = to_messages(rec, fmt)
        return {"messages": msgs, "format": found}
    return read_file(path, check_conversation, convert, skip_invalid)


def load_pairs(path, fmt="auto", skip_invalid=False):
    """Preference pairs (reward models, DPO) from a file in any of formats.PAIR_FORMATS -> (records,
    errors), each {"messages": the prompt, "chosen": reply, "rejected": reply, "format": name}; the
    prompt is checked as one (roles, contents, ending with the user's turn)."""
    def convert(rec):
        (prompt, chosen, rejected), found = to_pair(rec, fmt)
        return {"messages": prompt, "chosen": chosen, "rejected": rejected, "format": found}
    return read_file(path, check_prompt, convert, skip_invalid)


def load_documents(path, skip_invalid=False):
    """Documents for --stage pretrain (formats.read_text) -> (records, errors), each
    {"text": ..., "format": "text"}."""
    return read_file(path, lambda rec: None, lambda rec: {"text": rec["text"], "format": "text"}, skip_invalid,
                     reader=read_text)


def load_jsonl(path, check=check_conversation):
    """All records of a chat JSONL file (the messages format); raises ValueError listing every
    bad line as path:line: reason."""
    return read_file(path, check)[0]


# -----------------------------------------------------------------------------
# rendering and packing

def _split_exchanges(messages):
    """A conversation -> (its leading system messages, its exchanges): each exchange starts at a
    user turn and holds the replies that follow it."""
    n_sys = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    starts = [i for i in range(n_sys, len(messages)) if messages[i]["role"] == "user" or i == n_sys]
    return messages[:n_sys], [messages[a:b] for a, b in zip(starts, starts[1:] + [len(messages)])]


def without_oldest_exchanges(messages):
    """Yield (n, the conversation without its n oldest exchanges) for n = 0, 1, ... up to its last
    exchange alone: the ways to shorten a conversation that never cut a turn or lose the system
    prompt. Training data (render_within) and chat.py's history both shorten this way."""
    system, exchanges = _split_exchanges(messages)
    for n in range(len(exchanges)):
        yield n, system + [m for ex in exchanges[n:] for m in ex]


def render_within(template, messages, limit, train_on="all-assistant"):
    """(ids, mask, exchanges cut) of the conversation, cut by the fewest oldest exchanges that make it
    fit in `limit` tokens; None when even the last exchange alone does not fit."""
    for cut, shorter in without_oldest_exchanges(messages):
        ids, mask = template.render(shorter, train_on)
        if len(ids) <= limit:
            return ids, mask, cut
    return None


def render_conversations(records, template, row_len, train_on="all-assistant"):
    """Render every conversation -> (samples, counts). A sample is (ids, mask) int arrays. A
    conversation longer than row_len tokens loses its oldest exchanges (counted as "truncated");
    one whose last exchange alone is too long is left out (counted as "dropped"). Never cut mid-turn."""
    samples, counts = [], {"truncated": 0, "dropped": 0}
    for rec in records:
        fitted = render_within(template, rec["messages"], row_len, train_on)
        if fitted is None:
            counts["dropped"] += 1
            continue
        ids, mask, cut = fitted
        counts["truncated"] += cut > 0
        samples.append((np.array(ids, dtype=np.int32), np.array(mask, dtype=np.int8)))
    return samples, counts


def render_pairs(records, template, row_len):
    """Preference pairs (load_pairs') -> (samples, counts). A sample is ((ids, mask) of the prompt with
    the chosen reply, the same with the rejected one), the mask 1 on the reply and its end token only.
    Both sides lose the same oldest exchanges of the prompt until the longer fits in row_len tokens
    ("truncated"); a pair whose last exchange alone is too long is left out ("dropped"): a reply is
    never cut."""
    samples, counts = [], {"truncated": 0, "dropped": 0}
    for rec in records:
        sides = [rec["messages"] + [{"role": "assistant", "content": rec[k]}] for k in ("chosen", "rejected")]
        for (cut, chosen), (_, rejected) in zip(*[without_oldest_exchanges(side) for side in sides]):
            rendered = [template.render(side, "last-assistant") for side in (chosen, rejected)]
            if max(len(ids) for ids, _ in rendered) <= row_len:
                counts["truncated"] += cut > 0
                samples.append(tuple((np.array(ids, dtype=np.int32), np.array(m, dtype=np.int8)) for ids, m in rendered))
                break
        else:
            counts["dropped"] += 1
    return samples, counts


def render_prompts(records, template, prompt_len):
    """Conversations (load_conversations') -> (samples, counts) for the RL stages (ppo.py): a sample
    is (the prompt's ids, which ask for the last assistant turn, and that turn's text: the known
    answer a programmatic reward compares with). A prompt longer than prompt_len tokens loses its
    oldest exchanges ("truncated"), or is left out when its last question alone is ("dropped")."""
    samples, counts = [], {"truncated": 0, "dropped": 0}
    for rec in records:
        *asked, answer = rec["messages"]
        for cut, shorter in without_oldest_exchanges(asked + [answer]):
            ids = template.render_prompt(shorter[:-1])
            if len(ids) <= prompt_len:
                counts["truncated"] += cut > 0
                samples.append((ids, answer["content"]))
                break
        else:
            counts["dropped"] += 1
    return samples, counts


def render_documents(records, template, row_len):
    """Documents for --stage pretrain -> samples, every token supervised; a document longer than
    row_len tokens is cut into pieces of row_len that overlap by one token (nothing is lost)."""
    samples = []
    for rec in records:
        ids, mask = template.render_text(rec["text"])
        # consecutive pieces share one token: a piece's first token is only context, so the
        # piece before it predicts it and every token is learned once
        for a in range(0, max(len(ids) - 1, 1), row_len - 1):
            samples.append((np.array(ids[a:a + row_len], dtype=np.int32), np.array(mask[a:a + row_len], dtype=np.int8)))
    return samples


def pack(samples, row_len, pad_id, open_rows=8):
    """Pack whole samples into rows of row_len tokens. Returns a dict of (N, row_len) arrays:
    ids, mask, doc (index of the conversation within its row, -1 on padding), pos (position
    within the conversation). A few rows stay open at once and each sample goes to the fullest
    one it fits in, which wastes little space while staying O(len(samples))."""
    rows, open_ = [], []  # a row is a list of samples; open_ holds (used, row)

    def close(i):
        rows.append(open_.pop(i)[1])

    for s in samples:
        n = len(s[0])
        fits = [i for i, (used, _) in enumerate(open_) if used + n <= row_len]
        if fits:
            i = max(fits, key=lambda j: open_[j][0])
            used, row = open_[i]
            row.append(s)
            open_[i] = (used + n, row)
        else:
            if len(open_) == open_rows:
                close(max(range(len(open_)), key=lambda j: open_[j][0]))
            open_.append((n, [s]))
    while open_:
        close(0)
    return fill_rows(rows, row_len, pad_id)


def fill_rows(rows, row_len, pad_id):
    """Rows given as lists of samples -> the dict of (N, row_len) arrays described in pack()."""
    out = {"ids": np.full((len(rows), row_len), pad_id, dtype=np.int64),
           "mask": np.zeros((len(rows), row_len), dtype=np.int64),
           "doc": np.full((len(rows), row_len), -1, dtype=np.int64),
           "pos": np.zeros((len(rows), row_len), dtype=np.int64)}
    for r, row in enumerate(rows):
        t = 0
        for d, (ids, mask) in enumerate(row):
            n = len(ids)
            out["ids"][r, t:t + n] = ids
            out["mask"][r, t:t + n] = mask
            out["doc"][r, t:t + n] = d
            out["pos"][r, t:t + n] = np.arange(n)
            t += n
    return out


def padding_fraction(packed):
    return float((packed["doc"] < 0).mean())


def to_batch(packed, index, trim=False):
    """Rows `index` of a packed dict -> model inputs and targets, each (B, T) with T = row_len - 1,
    or with trim, less when every row ends in padding (the columns nobody uses are not computed;
    for unpacked rows; packed rows are full, and a fixed shape keeps bf16 runs reproducible).
    The mask is shifted with the targets: mask[t] says whether token t+1 is supervised, and never
    is when token t+1 opens the next conversation (no predicting across a seam of a packed row)."""
    rows = {k: torch.from_numpy(v[index]) for k, v in packed.items()}
    if trim:
        used = (rows["doc"] >= 0).any(0).nonzero()
        T = max(int(used[-1]) + 1 if len(used) else 0, 2)
        rows = {k: v[:, :T] for k, v in rows.items()}
    same_doc = rows["doc"][:, 1:] == rows["doc"][:, :-1]
    return {"idx": rows["ids"][:, :-1], "targets": rows["ids"][:, 1:], "loss_mask": rows["mask"][:, 1:] * same_doc,
            "pos": rows["pos"][:, :-1], "doc": rows["doc"][:, :-1]}


def shard(packed, rank, world, pad_id):
    """This rank's rows: every world-th row, after padding with empty rows (no tokens, mask 0)
    so that all ranks get the same number. Every rank must run the same number of forwards
    (ZeRO-3 gathers parameters collectively), and no conversation may be left out."""
    n = len(packed["ids"])
    extra = -n % world
    if extra:
        empty = {"ids": pad_id, "mask": 0, "doc": -1, "pos": 0}
        packed = {k: np.concatenate([v, np.full((extra, v.shape[1]), empty[k], v.dtype)]) for k, v in packed.items()}
    return {k: v[rank::world] for k, v in packed.items()}


def epoch_rows(samples, row_len, pad_id, seed, epoch, rank=0, world=1, packing=True, window=1024):
    """Shuffle (seeded per epoch, so every epoch has its own order), pack, and keep this rank's
    share of the rows. Without packing, each conversation has a row of its own, and conversations
    are sorted by length within windows of `window`: neighbours, which share micro-batches, have
    similar lengths, and to_batch cuts off the padding columns they all share."""
    order = list(range(len(samples)))
    random.Random(seed * 1000003 + epoch).shuffle(order)
    shuffled = [samples[i] for i in order]
    if packing:
        rows = pack(shuffled, row_len, pad_id)
    else:
        grouped = [s for w in range(0, len(shuffled), window)
                   for s in sorted(shuffled[w:w + window], key=lambda s: -len(s[0]))]
        rows = fill_rows([[s] for s in grouped], row_len, pad_id)
    return shard(rows, rank, world, pad_id)


def parse_source(spec):
    """"file.jsonl:0.7" -> ("file.jsonl", 0.7); "file.jsonl" -> ("file.jsonl", 1.0)."""
    path, _, weight = spec.rpartition(":")
    try:
        w = float(weight)
    except ValueError:
        return spec, 1.0
    if not path or not 0 < w < float("inf"):
        raise ValueError(f"--data {spec}: the weight after ':' must be a positive number")
    return path, w


class Blend:
    """Several datasets mixed by weight. An epoch holds as many conversations as all the sources
    together; source i contributes the share w_i / sum(w) of them, drawn anew every epoch: a
    small source with a large weight repeats (each of its conversations as evenly as possible),
    a large one with a small weight shows a different part of itself each epoch."""

    def __init__(self, sources, weights):
        self.sources = sources
        total = sum(len(s) for s in sources)
        self.counts = [round(w / sum(weights) * total) for w in weights]
        if 0 in self.counts:
            raise ValueError(f"weights {weights}: source {self.counts.index(0) + 1} would get no conversation at all")

    def __len__(self):
        return sum(self.counts)

    def epoch(self, seed, epoch):
        out = []
        for i, (source, n) in enumerate(zip(self.sources, self.counts)):
            rng = random.Random(f"{seed}:{epoch}:{i}")
            order = []
            while len(order) < n:  # whole passes over the source, each in a fresh order
                order += rng.sample(range(len(source)), len(source))
            out += [source[j] for j in order[:n]]
        return out


def split_off(samples, fraction, seed):
    """-> (kept, held_out): a seeded `fraction` of the samples held out for validation."""
    order = random.Random(f"val:{seed}").sample(range(len(samples)), len(samples))
    held = set(order[:round(fraction * len(samples))])
    return [s for i, s in enumerate(samples) if i not in held], [samples[i] for i in sorted(held)]


class Batches:
    """This rank's micro-batches, epoch after epoch, without end. Every epoch re-packs the
    conversations in its own seeded order (a fresh shuffle each epoch, the same on every rank so
    the ranks' shares never overlap); the rows an epoch has left over, fewer than a micro-batch,
    go first in the next epoch, so no row is skipped. The position is (epoch, cursor), which is
    all a resumed run needs: load_state_dict replays the epochs' packing to get back there."""

    def __init__(self, samples, row_len, pad_id, batch_size, seed, rank=0, world=1, packing=True):
        self.samples, self.row_len, self.pad_id, self.packing = samples, row_len, pad_id, packing
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self._start()

    def _rows(self, epoch):
        samples = self.samples.epoch(self.seed, epoch) if isinstance(self.samples, Blend) else self.samples
        return epoch_rows(samples, self.row_len, self.pad_id, self.seed, epoch, self.rank, self.world,
                          self.packing)

    def _start(self):
        self.epoch, self.cursor = 0, 0
        self.rows = self._rows(0)

    def _next_epoch(self):
        self.epoch += 1
        fresh = self._rows(self.epoch)
        self.rows = {k: np.concatenate([v[self.cursor:], fresh[k]]) for k, v in self.rows.items()}
        self.cursor = 0

    def _exhausted(self):  # fewer rows left than a micro-batch
        return self.cursor + self.batch_size > self.rows_per_epoch

    @property
    def epoch_done(self):
        """True when this epoch's rows are used up: the next micro-batch starts the next epoch."""
        return self._exhausted()

    @property
    def rows_per_epoch(self):
        return len(next(iter(self.rows.values())))  # of the current epoch, this rank's share

    def next(self):
        while self._exhausted():
            self._next_epoch()
        batch = to_batch(self.rows, slice(self.cursor, self.cursor + self.batch_size), trim=not self.packing)
        self.cursor += self.batch_size
        return batch

    def state_dict(self):
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state):
        self._start()
        while self.epoch < state["epoch"]:
            # the cursor moves a micro-batch at a time, so this is where it stood when the epoch ran out
            self.cursor = self.rows_per_epoch // self.batch_size * self.batch_size
            self._next_epoch()
        self.cursor = state["cursor"]


def pair_batch(samples, indices, pad_id):
    """Pairs `indices` of render_pairs' samples -> one batch of 2B rows, the B chosen replies first,
    then the B rejected ones in the same order, right-padded with pad_id: "ids" and "mask" (2B, L),
    "length" (2B,) (each row ends at its reply's end token: row i's is ids[i, length[i] - 1]) and
    "index" (B,) the pairs' indices (a DPO step looks up their reference log-probabilities)."""
    sides = [samples[i][0] for i in indices] + [samples[i][1] for i in indices]
    ends = [int(np.flatnonzero(m)[-1]) + 1 for _, m in sides]  # past the end token (the template may add more)
    ids = np.full((len(sides), max(ends)), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, ((i, m), n) in enumerate(zip(sides, ends)):
        ids[row, :n], mask[row, :n] = i[:n], m[:n]
    return {"ids": torch.from_numpy(ids), "mask": torch.from_numpy(mask), "length": torch.tensor(ends),
            "index": torch.as_tensor(np.asarray(indices, dtype=np.int64))}


class IndexBatches(Batches):
    """Batches of whole samples by index, for the stages that do not pack: each epoch shuffles the
    samples (seeded per epoch) and deals every world-th to this rank, every rank as many, so that
    all run the same number of forwards (the fewer than `world` samples left over by the division
    sit out this epoch). A batch is a list of indices: the RL stages' prompts (rlhf.py renders the
    rows once it has the replies); PairBatches builds its rows from them."""

    def __init__(self, samples, batch_size, seed, rank=0, world=1, pad_id=None):
        super().__init__(samples, None, pad_id, batch_size, seed, rank, world)

    def _order(self, epoch):
        order = list(range(len(self.samples)))
        random.Random(self.seed * 1000003 + epoch).shuffle(order)
        return order

    def _rows(self, epoch):
        order = self._order(epoch)
        return {"index": np.array(order[self.rank::self.world][:len(order) // self.world], dtype=np.int64)}

    def next(self):
        while self._exhausted():
            self._next_epoch()
        index = self.rows["index"][self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return index.tolist()


class PairBatches(IndexBatches):
    """Batches of preference pairs: as IndexBatches, with pairs of similar length side by side, and
    a batch is pair_batch's rows. No packing: a pair's two rows are compared, and a reward model
    reads each at its own end."""

    def __init__(self, samples, pad_id, batch_size, seed, rank=0, world=1, window=1024, chunk=64):
        self.window, self.chunk = window, chunk
        super().__init__(samples, batch_size, seed, rank, world, pad_id)

    def _order(self, epoch):
        order = super()._order(epoch)
        # sorted by length within windows, as unpacked rows are (epoch_rows): neighbours share a
        # micro-batch, padded to its longest row; then runs of `chunk` neighbours are shuffled, so
        # that a stretch of steps does not see only long (or only short) pairs. The order does not
        # depend on the batch size or the ranks: a global batch holds the same pairs however it
        # is split (tests/test_preference.py, ZeRO)
        longest = [max(len(self.samples[i][0][0]), len(self.samples[i][1][0])) for i in order]
        order = [order[j] for w in range(0, len(order), self.window)
                 for j in sorted(range(w, min(w + self.window, len(order))), key=lambda j: -longest[j])]
        chunks = [order[i:i + self.chunk] for i in range(0, len(order), self.chunk)]
        random.Random(self.seed * 1000003 + epoch).shuffle(chunks)
        return [i for c in chunks for i in c]

    def next(self):
        return pair_batch(self.samples, super().next(), self.pad_id)


if __name__ == "__main__":  # python -m nanosft.data check|stats: the command line is cli.py
    from nanosft.cli import data_main
    raise SystemExit(data_main())
