"""
Text generation with the KV cache: the prompt goes through the model once (prefill), then each new
token costs one forward of a single position, reusing the cached keys and values of all earlier
tokens. Yields token ids one at a time so that chat.py can stream them.

    for t in generate(model, prompt_ids, stop_ids={end_id}): ...

temperature 0 is greedy decoding (what evaluation uses); otherwise sample from the softmax of
logits / temperature, restricted to the top_k most likely tokens and/or the smallest set whose
probability reaches top_p.

greedy_batch answers many prompts of one length together, one forward per new token for all of
them: what evaluation uses, since a small model's decoding costs the same per forward for 1 row
or 64 (hundreds of tiny operations, not arithmetic). sample_batch does the same with sampling:
PPO's rollouts.
"""

import torch


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (V,) -> next token id (int)."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= top_p  # keep tokens until top_p is reached
        logits[order[drop]] = float("-inf")
    probs = torch.softmax(logits, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()  # no autograd bookkeeping at all: each step is a handful of tiny ops
def generate(model, prompt_ids, max_new_tokens=64, temperature=0.0, top_k=None, top_p=None,
             stop_ids=(), generator=None, vocab_size=None):
    """vocab_size: the tokenizer's; rows of the model past it (Qwen's embedding has spare ones) are
    no token, so they are never sampled."""
    context = model.cfg.max_seq_len  # positions the model has: prompt and reply must fit in them
    if len(prompt_ids) >= context:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in the context of {context}")
    max_new_tokens = min(max_new_tokens, context - len(prompt_ids))
    device = model.embed_tokens.weight.device
    cache = model.new_cache(batch=1, max_len=len(prompt_ids) + max_new_tokens)
    x = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T) prompt, then (1, 1)
    for _ in range(max_new_tokens):
        logits = model(x, cache=cache)[0, -1, :vocab_size]  # (V,) at the last position
        t = sample_next(logits, temperature, top_k, top_p, generator)
        if t in stop_ids:
            return
        yield t
        x = torch.tensor([[t]], dtype=torch.long, device=device)


@torch.inference_mode()
def greedy_batch(model, prompts, limits, stop_ids=(), vocab_size=None):
    """Greedy replies to prompts of one length, decoded side by side (no padding, so each row sees
    exactly what it would see alone). limits: the most new tokens for each prompt. -> a list of
    token ids per prompt, without the stop token: generate()'s tokens at temperature 0."""
    return decode_batch(model, prompts, limits, stop_ids, vocab_size, lambda logits: logits.argmax(-1))[0]


@torch.inference_mode()
def sample_batch(model, prompts, limits, stop_ids=(), vocab_size=None, temperature=1.0, generator=None):
    """As greedy_batch, but each row draws its next token from softmax(logits / temperature), with
    `generator` (a torch.Generator on the model's device: the same seed, the same replies). What
    PPO's rollouts use. -> (replies, stopped): per prompt its token ids, and whether a stop token
    ended it (then the reply ends with that token), or the limit did."""
    def draw(logits):  # (B, V) -> (B,)
        return torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1, generator=generator)[:, 0]
    return decode_batch(model, prompts, limits, stop_ids, vocab_size, draw, keep_stop=True)


def decode_batch(model, prompts, limits, stop_ids, vocab_size, pick, keep_stop=False):
    """The loop of greedy_batch and sample_batch: pick (B, V) logits -> (B,) next ids. -> (token
    ids per prompt, whether each stopped at a stop token, kept at the end with keep_stop)."""
    T, context = len(prompts[0]), model.cfg.max_seq_len
    if any(len(p) != T for p in prompts):
        raise ValueError("a batch of prompts decodes together: they need one length")
    if T >= context:
        raise ValueError(f"prompt of {T} tokens leaves no room in the context of {context}")
    limits = [min(n, context - T) for n in limits]
    cache = model.new_cache(batch=len(prompts), max_len=T + max(limits))
    x = torch.tensor(prompts, dtype=torch.long, device=model.embed_tokens.weight.device)  # (B, T), then (B, 1)
    out, done, stopped = [[] for _ in prompts], [n <= 0 for n in limits], [False] * len(prompts)
    for _ in range(max(limits)):
        if all(done):
            break
        next_ids = pick(model(x, cache=cache)[:, -1, :vocab_size])  # (B,)
        for i, t in enumerate(next_ids.tolist()):
            if not done[i]:  # finished rows ride along: cheaper than reshaping the cache
                if t in stop_ids:
                    done[i] = stopped[i] = True
                    if keep_stop:
                        out[i].append(t)
                else:
                    out[i].append(t)
                    done[i] = len(out[i]) >= limits[i]
        x = next_ids[:, None]
    return out, stopped


def reply(model, template, messages, max_new_tokens=64, **sampling):
    """The assistant's answer (text) to a conversation that ends with a user turn."""
    prompt = template.render_prompt(messages)
    ids = list(generate(model, prompt, max_new_tokens, stop_ids=template.stop_ids, vocab_size=template.tok.vocab_size,
                        **sampling))
    return template.tok.decode(ids)
