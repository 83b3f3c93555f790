"""
A tokenizer on disk, whichever kind it is: every command loads its tokenizer through `load_tokenizer`.

    load_tokenizer("runs/latest")             a directory: tokenizer.model (SentencePiece, tokenizer.py)
                                              or tokenizer.json (byte-level BPE, bpe.py), with
                                              tokenizer_config.json's special tokens and chat template
    load_tokenizer("tok.model" | "tok.json")  a file of either kind

A directory holding both files (Llama 2 and Mistral ship both) is read from tokenizer.model, the
file its model was trained with. The chat template comes along as `tok.chat_template` (the Jinja text,
as in Hugging Face's tokenizers); template.py reads which chat format it is from there.
"""

import os

from nanosft.bpe import ByteLevelBPE, load_tokenizer_json
from nanosft.files import read_json
from nanosft.tokenizer import Tokenizer


def load_tokenizer(path):
    """The tokenizer in a .model or tokenizer.json file, or in a directory (a run, an export, a
    Hugging Face model) -> Tokenizer or ByteLevelBPE; a clear error for anything else."""
    config = {}
    if os.path.isdir(path):
        config_file = os.path.join(path, "tokenizer_config.json")
        config = read_json(config_file) if os.path.exists(config_file) else {}
        if not isinstance(config, dict):
            raise ValueError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
        files = [os.path.join(path, name) for name in (Tokenizer.FILE, ByteLevelBPE.FILE)]
        file = next((f for f in files if os.path.exists(f)), None)
        if file is None:
            raise FileNotFoundError(f"{path}: neither {Tokenizer.FILE} nor {ByteLevelBPE.FILE} is there")
    elif not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found")
    else:
        file = path
    if file.endswith(".json"):
        tok = load_tokenizer_json(file, config, os.path.join(path, "tokenizer_config.json"))
    else:
        tok = Tokenizer.load(file)
    template = config.get("chat_template")
    jinja = os.path.join(path, "chat_template.jinja")  # where newer transformers versions save it
    if os.path.isdir(path) and os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            template = f.read()
    if isinstance(template, list):  # several named templates: the "default" one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    tok.chat_template = template if isinstance(template, str) else None
    return tok
