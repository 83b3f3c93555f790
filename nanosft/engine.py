"""
Continuous batching: many conversations decoded together, one forward pass per step for all of
them, each conversation joining and leaving between steps. What serve.py runs its model with.

Why batch at all: decoding one token of one conversation reads every weight of the model for a
handful of multiply-adds per weight; with 16 conversations in the same forward the weights are read
once for 16 tokens. On a CPU, and far more on a GPU, a step of 16 rows costs little more than a
step of one, so 16 concurrent streams get several times the tokens per second of one.

Why continuous: a static batch (generate.py's greedy_batch) starts its rows together and runs until
the longest is done; rows that finished early ride along as waste, and a request that arrives
meanwhile waits for the whole batch. Here the batch is re-formed at every step:

    loop:
        admit   the requests that wait, as many as there are free slots: their prompts prefilled
                into those slots (one forward for all of them), each its first token picked
        decode  one forward of (B, 1): each active slot's last token, at its own position
                (SlotCache: per-slot lengths, each row's mask hides other positions)
        pick    each row's next token with its own settings (greedy, temperature, top-k/top-p,
                its own seeded generator); a row that hits an end token or its limit leaves,
                and its slot is free for the next request at the next step
        cancel  a request whose client went away leaves at the next step too

Each slot is one row of a SlotCache (attention.py): preallocated keys and values for max_len
tokens, so nothing is allocated per request and a finished slot is reused by setting its length to
0. Every row attends only to its own keys, so a reply does not depend on which other conversations
share its steps (up to the rounding of a matrix product of another batch size: on this project's
CPU kernels the greedy replies measured identical, tests/test_serve.py).

The engine runs in one thread that owns the model; requests come from the server's threads through
a queue and receive their tokens through a queue of their own (Request.events).
"""

import heapq
import queue
import threading
from collections import deque

import torch

from nanosft.generate import sample_next


class Request:
    """One completion: a prompt (token ids) and how to continue it. The engine puts ("token", id)
    on `events` for each new token, then ("done", "stop" | "length" | "cancelled"), or ("error", message)."""

    def __init__(self, prompt, max_tokens, temperature=0.0, top_k=None, top_p=None, seed=None, ignore_eos=False):
        self.prompt, self.max_tokens, self.ignore_eos = list(prompt), max_tokens, ignore_eos
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()  # a fresh random seed
        else:
            self.generator.manual_seed(seed)
        self.events = queue.Queue()
        self.finished = threading.Event()  # set with the last event: a client waiting for more tokens may stop waiting
        self.tokens = []  # generated so far
        self.cancelled = False  # set by the client's thread: leave at the next step

    def cancel(self):
        self.cancelled = True


class Engine:
    """`slots` conversations decoded at a time, each up to max_len tokens (prompt and reply)."""

    def __init__(self, model, slots=16, max_len=None, stop_ids=(), vocab_size=None, max_waiting=1024,
                 prefill_tokens=8192):
        self.model, self.stop_ids, self.vocab_size = model, set(stop_ids), vocab_size
        self.max_waiting = max_waiting  # requests that may wait for a slot
        self.prefill_tokens = prefill_tokens  # (rows x longest prompt) one step prefills at most: a burst of
        #                                       long prompts must not build one huge mask and score matrix
        self.max_len = min(max_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self.cache = model.new_cache(slots, self.max_len, slots=True)
        self.free = list(range(slots))  # a heap: the lowest free slot first, so active ones stay together
        self.active = {}  # slot -> Request
        self.waiting = deque()
        self.wake = threading.Condition()
        self.steps = 0  # decode steps run (for tests and /health)
        self.thread, self.stopping = None, False

    # ---- the server's side (any thread)

    def submit(self, request):
        """Queue a request; queue.Full when --max-waiting requests wait already (the server says 429)."""
        if len(request.prompt) >= self.max_len:  # (the server checks first; this guards the cache)
            raise ValueError(f"prompt of {len(request.prompt)} tokens leaves no room in the context of {self.max_len}")
        with self.wake:
            if len(self.waiting) >= self.max_waiting:
                raise queue.Full(f"{len(self.waiting)} requests wait for a slot already")
            self.waiting.append(request)
            self.wake.notify()

    def load(self):
        """-> (active, waiting, free slots): what /health reports."""
        with self.wake:
            return len(self.active), len(self.waiting), len(self.free)

    def start(self):
        self.thread = threading.Thread(target=self.run, name="engine", daemon=True)
        self.thread.start()
        return self

    # ---- the engine's thread

    def stop(self):
        """End the engine's thread after its current step (the server is closing); every request
        still there gets an error, so that no client waits for ever."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread is not None:
            self.thread.join()
        for slot in list(self.active):
            self.leave(slot, ("error", "the server is stopping"))
        while self.waiting:
            self.end(self.waiting.popleft(), ("error", "the server is stopping"))

    def run(self):
        while True:
            with self.wake:
                while not self.active and not self.waiting and not self.stopping:
                    self.wake.wait()
                if self.stopping:
                    return
            try:
                self.step()
            except Exception as e:  # a bug or an out-of-memory must not leave clients waiting for ever
                for slot in list(self.active):
                    self.leave(slot, ("error", f"{type(e).__name__}: {e}"))

    @torch.inference_mode()
    def step(self):
        """Admit waiting requests into free slots (prefill), then one decode step for all."""
        joining = self.admit()
        if joining:
            try:
                self.prefill(joining)
            except Exception as e:  # (out of memory, say): the joining requests fail, the others go on
                failed = ("error", f"{type(e).__name__}: {e}")
                for slot, request in list(self.active.items()):
                    if request in joining:
                        self.leave(slot, failed)
                for request in joining:
                    if not request.finished.is_set():  # (failed before it had a slot)
                        self.end(request, failed)
        for slot, request in list(self.active.items()):
            if request.cancelled:
                self.leave(slot, ("done", "cancelled"))
        rows = sorted(self.active)  # each feeds its last token (a fresh one: the token its prefill picked)
        if not rows:
            return
        self.cache.use(rows)
        last = torch.tensor([[self.active[s].tokens[-1]] for s in rows], device=self.cache.device)  # (B, 1)
        self.pick(self.model(last, cache=self.cache)[:, -1, :self.vocab_size], rows)  # (B, V) logits
        self.steps += 1

    def admit(self):
        """The waiting requests that join now: as many as there are free slots, while their padded
        prompts (rows x the longest) stay within prefill_tokens (one at least). Cancelled ones end."""
        joining, longest = [], 0
        with self.wake:
            while self.waiting and len(joining) < len(self.free):
                request = self.waiting[0]
                if request.cancelled:
                    self.end(self.waiting.popleft(), ("done", "cancelled"))
                    continue
                longest = max(longest, len(request.prompt))
                if joining and (len(joining) + 1) * longest > self.prefill_tokens:
                    break  # the next step takes it
                joining.append(self.waiting.popleft())
        return joining

    def prefill(self, requests):
        """The prompts of joining requests in one forward, each into a free slot: right-padded to the
        longest, each row at positions 0..T-1 of its slot. The padding's keys land past a slot's
        length once it is set to its prompt's, hidden from then on like any stale key."""
        slots = [heapq.heappop(self.free) for _ in requests]
        T = max(len(r.prompt) for r in requests)
        ids = torch.tensor([r.prompt + [0] * (T - len(r.prompt)) for r in requests],
                           device=self.model.embed_tokens.weight.device)  # (B, T)
        for slot, request in zip(slots, requests):
            self.active[slot] = request
            self.cache.lens[slot] = 0  # the slot's old keys are now past its length: hidden
        self.cache.use(slots)
        hidden = self.model.hidden(ids, cache=self.cache)  # (B, T, C)
        last = torch.tensor([len(r.prompt) - 1 for r in requests], device=ids.device)  # (B,) each prompt's end
        for slot, request in zip(slots, requests):
            self.cache.lens[slot] = len(request.prompt)
        logits = self.model.lm_head(hidden[torch.arange(len(requests)), last])[:, :self.vocab_size]  # (B, V)
        self.pick(logits, slots)  # each one's first token

    def pick(self, logits, rows):
        """logits (B, V): each row's next token, picked with its request's settings (the greedy ones
        with one argmax over the batch), handed to its client; or the end of its reply."""
        greedy = logits.argmax(-1).tolist()  # (B,)
        for i, slot in enumerate(rows):
            request = self.active[slot]
            try:
                t = greedy[i] if request.temperature <= 0 else sample_next(  # (on the CPU: the request's generator is)
                    logits[i].cpu(), request.temperature, request.top_k, request.top_p, request.generator)
            except RuntimeError as e:  # (a distribution torch cannot sample from): this request alone fails
                self.leave(slot, ("error", f"sampling failed: {e}"))
                continue
            self.emit(slot, t)

    def emit(self, slot, t):
        """Hand `slot`'s new token t to its client, or end the reply."""
        request = self.active[slot]
        if t in self.stop_ids and not request.ignore_eos:
            return self.leave(slot, ("done", "stop"))
        request.tokens.append(t)
        request.events.put(("token", t))
        room = self.max_len - len(request.prompt) - len(request.tokens)  # positions left for more
        if len(request.tokens) >= request.max_tokens or room <= 0:
            self.leave(slot, ("done", "length"))

    def leave(self, slot, event):
        self.end(self.active.pop(slot), event)
        heapq.heappush(self.free, slot)

    @staticmethod
    def end(request, event):
        request.events.put(event)
        request.finished.set()
