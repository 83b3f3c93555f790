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
"""

ROLES = ("system", "user", "assistant")
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


class ChatTemplate:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.bos = tokenizer.bos_id
        # padding only fills packed rows (never attended to by real tokens, never in the loss), so
        # a tokenizer without <pad> (Llama's) can pad with <unk>
        self.pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.unk_id
        self.end = tokenizer.token_id("<|end|>")
        self.header = {role: tokenizer.token_id(f"<|{role}|>") for role in ROLES}
        # generation ends at <|end|>; any other control token means the model is starting a turn
        # that is not its own, so that ends the reply too
        self.stop_ids = {self.end, self.bos, tokenizer.eos_id, *self.header.values()} - {-1}

    def render(self, messages, train_on="all-assistant"):
        """Whole conversation -> (ids, mask), two lists of equal length. train_on: "all-assistant"
        supervises every assistant turn, "last-assistant" only the final one (the earlier ones are
        then context, like the user's turns)."""
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, not {train_on!r}")
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        ids, mask = ([self.bos], [0]) if self.bos >= 0 else ([], [])
        for i, m in enumerate(messages):
            content = self.tok.encode(m["content"])
            supervised = int(m["role"] == "assistant" and (train_on == "all-assistant" or i == last))
            ids += [self.header[m["role"]]] + content + [self.end]
            mask += [0] + [supervised] * (len(content) + 1)  # content and its <|end|>
        return ids, mask

    def render_text(self, text):
        """Plain text for --stage pretrain -> (ids, mask): <s> text </s>, every token after <s>
        supervised (</s> too: the model learns where documents end)."""
        ids = ([self.bos] if self.bos >= 0 else []) + self.tok.encode(text) + ([self.tok.eos_id] if self.tok.eos_id >= 0 else [])
        return ids, [0] * (self.bos >= 0) + [1] * (len(ids) - (self.bos >= 0))

    def render_prompt(self, messages):
        """Conversation so far (ending with a user turn) -> ids that ask for the assistant's reply."""
        ids, _ = self.render(messages)
        return ids + [self.header["assistant"]]
