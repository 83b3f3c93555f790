"""
Talk to a trained run.

    python chat.py                                  # interactive, multi-turn, runs/latest
    python chat.py --prompt "Which is larger, 418 or 96?"        # one answer, then exit
    python chat.py --batch prompts.jsonl > replies.jsonl         # {"messages": [...]} per line in,
                                                                 # {"reply": "..."} per line out
    python chat.py --batch prompts.jsonl --temperature 0.8 --seed 1   # sampled: line i's reply depends
                                                                 # on --seed and that line alone

--ckpt takes a run directory (runs/<name>) or a Hugging Face directory (an export, or a
Llama-family model with a tokenizer.model), or a quantized one (python -m nanosft.quantize);
--quantize int8|int4 quantizes the weights as they are loaded. Replies stream token by token
through the KV cache (nanosft/generate.py); when the conversation outgrows the context, its
oldest exchanges are dropped.

Interactive commands:
    /reset          forget the conversation (the system message stays)
    /system TEXT    start a new conversation with this system message (/system alone: without one)
    /quit           leave (so does Ctrl-D); Ctrl-C stops a reply, or at the prompt clears the line
Prompts can come from a pipe as well:  printf 'My name is Ada.\nWhat is my name?\n' | python chat.py
"""

import argparse
import importlib
import json
import os
import sys

import torch

from nanosft.adapter import load_adapter
from nanosft.checkpoint import describe_path, load_model
from nanosft.data import check_prompt, load_jsonl, without_oldest_exchanges
from nanosft.generate import generate, reply
from nanosft.machine import decoding_threads
from nanosft.quantize import QUANTIZE, quantize_model
from nanosft.template import ChatTemplate


def parse_args():
    p = argparse.ArgumentParser(description="chat with a model trained by train.py")
    p.add_argument("--ckpt", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs/latest"),
                   help="run directory or Hugging Face model directory")
    p.add_argument("--adapter", default=None, help="a LoRA adapter directory (nanosft's or PEFT's) to add to "
                   "--ckpt's model, unmerged")
    p.add_argument("--quantize", default=None, choices=QUANTIZE, help="chat with the model's weights quantized "
                   "(nanosft/quantize.py; an --adapter is merged first)")
    p.add_argument("--prompt", default=None, help="answer this one message and exit")
    p.add_argument("--batch", default=None, help='JSONL of {"messages": [...]} ending with a user turn')
    p.add_argument("--system", default=None, help="system message for --prompt and interactive chat")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: the faster of 1 and all cores, measured)")
    args = p.parse_args()
    if args.top_k is not None and args.top_k < 1:
        p.error("--top-k must be at least 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error("--top-p must be in (0, 1]")
    if args.threads < 0:
        p.error("--threads must not be negative (0: measured)")
    if args.max_new_tokens < 1 or not 0 <= args.temperature < float("inf"):
        p.error("--max-new-tokens must be at least 1 and --temperature a number not negative")
    return args


def stream_reply(model, template, messages, args, generator):
    """Print the reply as it is generated; return its text. Only whole characters are printed:
    a character split over several byte tokens waits until its last byte arrives. Ctrl-C stops
    the reply early and keeps what was said."""
    ids, shown = [], ""
    prompt = template.render_prompt(messages)
    try:
        for t in generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                          stop_ids=template.stop_ids, generator=generator, vocab_size=template.tok.vocab_size):
            ids.append(t)
            text = template.tok.decode(ids)
            if not text.endswith("\ufffd"):
                # marked shown before it is printed: a Ctrl-C landing between the two must not have
                # the print below repeat it
                piece, shown = text[len(shown):], text
                print(piece, end="", flush=True)
    except KeyboardInterrupt:
        pass
    text = template.tok.decode(ids)
    print(text[len(shown):], flush=True)
    return text


def fit_history(template, messages, context, room):
    """Drop the oldest exchanges (a user turn and the replies to it) until the prompt leaves `room`
    of the `context` tokens free, as training data is shortened (data.py). The system message and
    the last user turn always stay; if they alone are too long, generate() says so."""
    shorter = messages
    for _, shorter in without_oldest_exchanges(messages):
        if len(template.render_prompt(shorter)) <= context - room:
            break
    return shorter


def room_for_reply(model, args):
    """Tokens kept free for the reply when old exchanges are dropped."""
    return min(args.max_new_tokens, model.cfg.max_seq_len // 2)


COMMANDS = "/reset forgets the conversation, /system TEXT starts one with a system message, /quit or Ctrl-D ends"


def interactive(model, template, args, generator):
    system = args.system  # None: no system message
    turns = []  # the user/assistant messages so far
    tty = sys.stdin.isatty()
    sys.stdin.reconfigure(errors="surrogateescape")  # bytes that are not UTF-8 reach the check below, not a crash
    if tty:
        try:
            importlib.import_module("readline")  # line editing and history for input()
        except ImportError:  # not on every platform
            pass
    print(f"chat with {describe_path(args.ckpt)}; {COMMANDS}")
    while True:
        try:
            line = input("> ")
        except EOFError:  # Ctrl-D, or the end of a pipe
            print()
            return
        except KeyboardInterrupt:  # at the prompt: drop the line, as a shell does
            print("\n(Ctrl-D or /quit to leave)")
            continue
        try:  # bytes that are not UTF-8 arrive as lone surrogates, which no tokenizer can encode
            line.encode("utf-8")
        except UnicodeEncodeError as e:
            print(f"(not valid UTF-8 text at character {e.start + 1}; line ignored)")
            continue
        if not tty:  # from a pipe: show what was asked, so the transcript reads as a conversation
            print(line)
        command, _, rest = line.strip().partition(" ")
        if command == "/quit":
            return
        elif command == "/reset":
            turns = []
            print("(conversation forgotten)")
        elif command == "/system":  # a system message frames a whole conversation: start a new one
            system, turns = rest.strip() or None, []
            print(f"(new conversation, system message: {system})" if system else "(new conversation, no system message)")
        elif command.startswith("/"):
            print(f"(unknown command {command}; {COMMANDS})")
        elif line.strip():
            head = [{"role": "system", "content": system}] if system else []
            try:
                attempt = fit_history(template, head + turns + [{"role": "user", "content": line}],
                                      model.cfg.max_seq_len, room_for_reply(model, args))
                answer = stream_reply(model, template, attempt, args, generator)
            except ValueError as e:  # the message alone does not fit in the context
                print(f"(message too long for this model: {e}; not added to the conversation)")
                continue
            except KeyboardInterrupt:  # Ctrl-C before the reply began (stream_reply handles it after)
                print("\n(stopped; not added to the conversation)")
                continue
            turns = attempt[len(head):] + [{"role": "assistant", "content": answer}]


def main():
    args = parse_args()
    try:
        model, tok = load_model(args.ckpt)
    except ValueError as e:  # a directory we cannot load: the message says why
        sys.exit(f"error: {e}")
    except FileNotFoundError as e:
        sys.exit(f"No trained model at {args.ckpt} ({e}).\n"
                 "Train one first:  make train   (or: python train.py --out runs/NAME, then --ckpt runs/NAME)")
    except OSError as e:  # a folder where a file should be, no permission, ...
        sys.exit(f"error: {e}")
    if args.adapter:
        try:
            load_adapter(args.adapter, model).eval()
        except (OSError, ValueError) as e:
            sys.exit(f"error: {e}")
    if args.quantize:
        try:
            quantize_model(model, args.quantize)
        except ValueError as e:  # a model already quantized; int4 and a width not in groups of 32
            sys.exit(f"error: {e}")
    template = ChatTemplate(tok)
    generator = torch.Generator().manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    else:  # the faster of 1 thread and all cores for decoding, measured now (nanosft/machine.py)
        decoding_threads(model)
    if args.batch:
        try:
            records = load_jsonl(args.batch, check_prompt)
        except (ValueError, OSError) as e:
            sys.exit(f"error: {e}")
        for i, rec in enumerate(records):  # one JSON line per input line, in order
            messages = fit_history(template, rec["messages"], model.cfg.max_seq_len, room_for_reply(model, args))
            # each line its own generator, seeded by --seed and its line number: a line's sampled
            # reply does not depend on the lines before it (greedy, at temperature 0, draws nothing)
            line_gen = torch.Generator().manual_seed(args.seed * 1_000_003 + i)
            try:
                out = {"reply": reply(model, template, messages, args.max_new_tokens, temperature=args.temperature,
                                      top_k=args.top_k, top_p=args.top_p, generator=line_gen)}
            except ValueError as e:  # even the last user turn alone is longer than the context
                out = {"reply": "", "error": str(e)}
            print(json.dumps(out, ensure_ascii=False), flush=True)
    elif args.prompt is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) \
            + [{"role": "user", "content": args.prompt}]
        try:
            stream_reply(model, template, messages, args, generator)
        except ValueError as e:
            sys.exit(f"error: {e}")
    else:
        interactive(model, template, args, generator)


if __name__ == "__main__":
    main()
