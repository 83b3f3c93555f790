"""
Export a model as a Hugging Face directory, the door to other tools (transformers, vLLM, llama.cpp's
converters):

    python -m nanosft.export runs/latest exported/      # a nanosft run, or any directory load_model reads

writes config.json, model.safetensors, tokenizer.model, and tokenizer_config.json with the chat
template; transformers' AutoModelForCausalLM.from_pretrained("exported/") then loads the very same
model, and AutoTokenizer's apply_chat_template prompts it as chat.py does. (Except for an
attention variant no Hugging Face architecture computes, ALiBi or soft-capping for example: its
config.json says model_type "nanosft", which transformers refuses rather than build another model.)
"""

import argparse
import sys

from nanosft.checkpoint import load_model, save_model
from nanosft.quantize import quantization


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m nanosft.export", description=__doc__.strip().splitlines()[0])
    p.add_argument("src", help="a nanosft run directory or a Hugging Face Llama-family directory")
    p.add_argument("dst", help="the directory to write")
    args = p.parse_args(argv)
    try:
        model, tok = load_model(args.src)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    if quantization(model):  # nanosft's own tensors (quantize.py), which no other tool reads
        sys.exit(f"error: {args.src} is quantized ({quantization(model)['method']}); export the model it came from")
    save_model(args.dst, model.state_dict(), model.cfg, tok)
    print(f"wrote {args.dst}: {model.num_params():,} parameters, vocabulary {tok.vocab_size}")


if __name__ == "__main__":
    main()
