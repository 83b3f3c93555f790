"""
The chat template: a conversation (a list of {"role", "content"} messages) becomes one sequence
of token ids plus a loss mask that says which tokens the model is trained to predict.

    <s> <|system|> You are terse. <|end|> <|user|> Hi <|end|> <|assistant|> Hello! <|end|> ...
     0      0           0            0       0     0    0         0           1     1    <- mask

The mask is 1 on every assistant turn's content and on the <|end|> that closes it, 0 everywhere
else (system, user, the <|assistant|> header). Supervising <|end|> is what teaches the model to
stop; supervising the prompt would teach it to imitate users (DeepSpeed-Chat does the latter).

The role markers are CONTROL tokens: the tokenizer never produces them from text, so a user
typing "<|end|>" cannot forge a turn boundary. Used by data.py (training rows), generate.py and
chat.py (prompts ending in "<|assistant|>").

Three chat formats, the markers above being nanosft's own; a base model is best fine-tuned in the
format it was trained with, which its tokenizer's Jinja chat template tells (detect_format):

    chatml   <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n     Qwen, SmolLM2
    llama3   <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>...       Llama 3.x

rendered id for id as transformers' apply_chat_template renders those models' own templates
(tests/test_template.py runs them), with the same loss mask rule: assistant content and its end token.
"""

import datetime
import re

from nanosft.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
FORMATS = ("nanosft", "chatml", "llama3")
# the control tokens each format needs; with_markers adds those a vocabulary lacks
MARKERS = {"nanosft": Tokenizer.CHAT_TOKENS, "chatml": ("<|im_start|>", "<|im_end|>"),
           "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}
LLAMA31_DATE = "26 Jul 2024"  # the date Llama 3.1's template writes when it is not told today's
TRAIN_ON = ("all-assistant", "last-assistant")

# The same rendering as a Jinja template, the form a Hugging Face tokenizer carries it in
# (tokenizer_config.json's "chat_template"; checkpoint.py writes it there), so that other tools
# prompt an exported model exactly as nanosft does: apply_chat_template(messages,
# add_generation_prompt=True) gives render_prompt's ids (tests/test_checkpoint.py holds them equal).
# Each content is tokenized on its own there too, as the markers around it are special tokens.
# NOTE: one difference remains, in the nature of a template that renders text: a content that spells
# a marker ("<|end|>") becomes that marker there, where nanosft's template keeps it plain text.
JINJA = ("{%- if bos_token %}{{ bos_token }}{% endif -%}"
         "{%- for message in messages -%}"
         "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
         "{{ raise_exception('the roles are system, user and assistant, not ' + message['role']) }}"
         "{%- endif -%}"
         "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
         "{%- endfor -%}"
         "{%- if add_generation_prompt %}{{ '<|assistant|>' }}{% endif -%}")


# The other formats as Jinja, for a model trained in a format its base did not come with (a base
# model's own template is kept as it is, default system turn and all)
CHATML_JINJA = ("{%- for message in messages %}"
                "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
                "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")

LLAMA3_JINJA = ("{%- for message in messages %}{%- if loop.first and bos_token %}{{ bos_token }}{%- endif %}"
                "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
                " + '<|eot_id|>' }}{%- endfor %}"
                "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")


def detect_format(jinja):
    """A Jinja chat template -> the settings ChatTemplate renders it with ({"chat_format", ...}), or
    None for a template of another kind (Llama 2's [INST], Gemma's, ...). Read from the markers the
    template writes: <|im_start|> is ChatML (with the default system turn it inserts, if any, and
    Qwen3's <think> block); <|start_header_id|> is Llama 3 (3.1 and later: a system turn with the
    knowledge cutoff and the date, always)."""
    if not jinja:
        return None
    if jinja == JINJA:
        return {"chat_format": "nanosft"}
    if "<|im_start|>" in jinja:
        # the default is the one system turn the template spells out whole, as a string literal
        m = re.search(r"""<\|im_start\|>system(?:\\n|\n)([^'"+{}]+?)<\|im_end\|>""", jinja)
        default = m.group(1).replace("\\n", "\n") if m else None
        return {"chat_format": "chatml", "default_system": default, "think": "<think>" in jinja}
    if "<|start_header_id|>" in jinja:
        date = None
        if "Cutting Knowledge Date" in jinja:  # 3.1+: today's date where the template asks for it
            date = datetime.date.today().strftime("%d %b %Y") if "strftime_now" in jinja else LLAMA31_DATE
        return {"chat_format": "llama3", "date": date}
    return None


def with_markers(tok, chat_format=None):
    """`tok` with the control tokens `chat_format` needs (default: the format of its own chat template,
    else nanosft's) added where its vocabulary lacks them, as a base model's does."""
    chat_format = chat_format or (detect_format(tok.chat_template) or {"chat_format": "nanosft"})["chat_format"]
    return tok.with_control_tokens(MARKERS[chat_format])


class ChatTemplate:
    def __init__(self, tokenizer, chat_format=None, date=None):
        """chat_format: one of FORMATS; default: the format of the tokenizer's own chat template
        (tok.chat_template, read from the model directory), else nanosft's. date: the date a Llama
        3.1+ system turn gives (default today's, as transformers renders it; a run keeps its own)."""
        self.tok = tokenizer
        own = detect_format(tokenizer.chat_template)
        settings = own if own and chat_format in (None, own["chat_format"]) else {"chat_format": chat_format or "nanosft"}
        self.format = settings["chat_format"]
        if self.format not in FORMATS:
            raise ValueError(f"chat format must be one of {', '.join(FORMATS)}, not {self.format!r}")
        self.default_system, self.think, self.date = (settings.get(k) for k in ("default_system", "think", "date"))
        if self.date is not None and date is not None:
            self.date = date
        # what an export writes as its chat template: the base model's own where it is the one rendered
        self.jinja = tokenizer.chat_template if settings is own else \
            {"nanosft": JINJA, "chatml": CHATML_JINJA, "llama3": LLAMA3_JINJA}[self.format]
        self.bos = tokenizer.bos_id
        # padding only fills packed rows (never attended to by real tokens, never in the loss), so
        # a tokenizer without <pad> (Llama's, Qwen's) pads with <unk> or the end of text
        self.pad = next((i for i in (tokenizer.pad_id, tokenizer.unk_id, tokenizer.eos_id) if i >= 0), 0)
        # what rendering depends on besides the tokenizer's vocabulary (the sample cache's key)
        self.signature = [self.format, self.default_system, self.think, self.date, self.bos, tokenizer.eos_id, self.pad]
        try:
            marker = {name: tokenizer.token_id(name) for name in MARKERS[self.format]}
        except KeyError as e:
            raise ValueError(f"the {self.format} chat format needs the control token {e.args[0]} (with_markers adds it)") from None
        if self.format == "nanosft":
            self.header = {role: marker[f"<|{role}|>"] for role in ROLES}
            self.end = marker["<|end|>"]
            starts = self.header.values()
        elif self.format == "chatml":
            self.start, self.end = marker["<|im_start|>"], marker["<|im_end|>"]
            starts = [self.start]
        else:
            self.start, self.end_header, self.end = (marker[n] for n in MARKERS["llama3"])
            starts = [self.start]
        # generation ends at the turn's end token; any other control token that opens a turn means
        # the model is starting a turn that is not its own, so that ends the reply too
        self.stop_ids = {self.end, self.bos, tokenizer.eos_id, *starts} - {-1}

    # ---- a conversation as parts: control token ids, and text with where its content starts

    def turn(self, role, content, think=None):
        """One message -> [part]: an int is a control token; (text, start) is text encoded as one
        piece, its content from character `start` on (None: no content in it); self.end closes the
        turn. think, for Qwen3's replies, as its template writes the reasoning a reply
        spells in <think>...</think>: "drop" it, "show" it (an empty block if none), or show it
        "if_any"."""
        if self.format == "nanosft":
            return [self.header[role], (content, 0), self.end]
        if self.format == "chatml":
            if think:
                answer, reasoning = split_reasoning(content)
                show = think == "show" or think == "if_any" and reasoning
                content = f"<think>\n{reasoning}\n</think>\n\n" + answer if show else answer
            return [self.start, (f"{role}\n{content}", len(role) + 1), self.end, ("\n", None)]
        return [self.start, (role, None), self.end_header, ("\n\n" + content.strip(), 2), self.end]

    def opening(self, messages):
        """-> (parts before the first message's turn, the messages that still follow)."""
        parts = [self.bos] if self.bos >= 0 and self.format != "chatml" else []
        if self.format == "chatml" and self.default_system and (not messages or messages[0]["role"] != "system"):
            parts += self.turn("system", self.default_system)
        if self.format == "llama3" and self.date is not None:  # 3.1+: always a system turn, with the date
            system = messages[0]["content"].strip() if messages and messages[0]["role"] == "system" else ""
            preamble = f"\n\nCutting Knowledge Date: December 2023\nToday Date: {self.date}\n\n"
            parts += [self.start, ("system", None), self.end_header, (preamble + system, None), self.end]
            messages = messages[1:] if messages and messages[0]["role"] == "system" else messages
        return parts, messages

    def encode_parts(self, parts, supervised):
        """[part] -> (ids, mask): with `supervised`, the content and the end token are 1. Text and its
        content prefix are encoded together, as the model's own tokenizer sees a rendered template;
        a token that straddles the two counts as content (the model has to write it)."""
        ids, mask = [], []
        for part in parts:
            if isinstance(part, int):
                ids.append(part)
                mask.append(int(supervised and part == self.end))
                continue
            text, start = part
            got = self.tok.encode(text)
            head = len(got) if start is None else common_prefix(got, self.tok.encode(text[:start])) if start else 0
            ids += got
            mask += [0] * head + [int(supervised)] * (len(got) - head)
        return ids, mask

    def render(self, messages, train_on="all-assistant"):
        """Whole conversation -> (ids, mask), two lists of equal length. train_on: "all-assistant"
        supervises every assistant turn, "last-assistant" only the final one (the earlier ones are
        then context, like the user's turns)."""
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, not {train_on!r}")
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        # Qwen3's "last query": the last user turn that is no tool's response (none: the last message)
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user" and not (
            m["content"].startswith("<tool_response>") and m["content"].endswith("</tool_response>"))),
            default=len(messages) - 1)
        parts, rest = self.opening(messages)
        ids, mask = self.encode_parts(parts, False)
        skipped = len(messages) - len(rest)
        for i, m in enumerate(rest, skipped):
            think = None
            if self.think and m["role"] == "assistant":  # Qwen3: thinking shown after the last query only
                think = "drop" if i <= last_user else "show" if i == len(messages) - 1 else "if_any"
            supervised = m["role"] == "assistant" and (train_on == "all-assistant" or i == last)
            more_ids, more_mask = self.encode_parts(self.turn(m["role"], m["content"], think), supervised)
            ids += more_ids
            mask += more_mask
        return ids, mask

    def render_text(self, text):
        """Plain text for --stage pretrain -> (ids, mask): <s> text </s>, every token after <s>
        supervised (</s> too: the model learns where documents end)."""
        ids = ([self.bos] if self.bos >= 0 else []) + self.tok.encode(text) + ([self.tok.eos_id] if self.tok.eos_id >= 0 else [])
        return ids, [0] * (self.bos >= 0) + [1] * (len(ids) - (self.bos >= 0))

    def render_prompt(self, messages):
        """Conversation so far (ending with a user turn) -> ids that ask for the assistant's reply."""
        ids, _ = self.render(messages)
        if self.format == "nanosft":
            return ids + [self.header["assistant"]]
        if self.format == "chatml":
            return ids + [self.start] + self.tok.encode("assistant\n")
        return ids + [self.start] + self.tok.encode("assistant") + [self.end_header] + self.tok.encode("\n\n")

    def render_reply(self, content):
        """An assistant reply's text -> the ids the model writes after render_prompt's: its content and
        the end token (the supervised part of its turn)."""
        ids, mask = self.encode_parts(self.turn("assistant", content), True)
        return [t for t, m in zip(ids, mask) if m]


def common_prefix(a, b):
    """How many leading items a and b share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def split_reasoning(content):
    """Qwen3's reading of a reply: "<think>\nreasoning\n</think>\n\nanswer" -> (answer, reasoning),
    both without the newlines around them ("" reasoning for a reply without </think>)."""
    if "</think>" not in content:
        return content, ""
    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return content.split("</think>")[-1].lstrip("\n"), reasoning.strip("\n")
