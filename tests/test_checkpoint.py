"""checkpoint.py promises: a saved run loads back to the very same model (tied weights still one
matrix, stored once) and tokenizer, with weights read without pickle's code execution."""

import os

import torch

from nanosft.checkpoint import load_run, point_latest, save_model
from nanosft.model import ModelConfig, Transformer
from nanosft.tokenizer import Tokenizer


def test_saved_run_loads_back_to_identical_logits_with_tied_weights_shared(tmp_path):
    torch.manual_seed(0)
    tok = Tokenizer.train(["hello world", "how are you", "你好"] * 10, vocab_size=300)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layer=2, n_head=2, n_kv_head=1)).eval()
    run = tmp_path / "runs" / "a"
    save_model(run, model.state_dict(), model.cfg)
    tok.save(run / "tokenizer.model")
    loaded, tok2 = load_run(run)
    idx = torch.tensor([tok.encode("hello 你好 world")])
    torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert tok2.encode("how are you") == tok.encode("how are you")
    # the shared matrix is written once: the file is about one embedding smaller than two copies
    emb_bytes = tok.vocab_size * 32 * 4
    total = sum(p.numel() for p in model.parameters()) * 4
    assert os.path.getsize(run / "model.pt") < total + emb_bytes / 2


def test_latest_points_at_the_newest_run(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        point_latest(tmp_path / name)
    assert os.path.realpath(tmp_path / "latest") == str(tmp_path / "b")
