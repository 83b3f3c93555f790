"""reward.py promises: a score read at each row's end token from the decoder's final hidden state,
the same score transformers' LlamaForSequenceClassification gives with the same weights; a fresh
head scores everything 0; the pairwise loss is the Bradley-Terry one."""

import math

import torch

from nanosft.checkpoint import hf_state_dict
from nanosft.model import ModelConfig, Transformer
from nanosft.reward import RewardModel, pairwise_loss


def test_scores_equal_transformers_sequence_classifier_at_the_end_token():
    import transformers
    cfg = ModelConfig(vocab_size=97, dim=64, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=64, tie_embeddings=False)
    torch.manual_seed(0)
    rm = RewardModel(Transformer(cfg))
    with torch.no_grad():
        rm.score.weight.normal_()
    hf_cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=cfg.ffn_hidden,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, rms_norm_eps=cfg.norm_eps, num_labels=1,
                                      pad_token_id=0)
    ref = transformers.LlamaForSequenceClassification(hf_cfg).eval()
    state = {k: v for k, v in hf_state_dict(rm.model.state_dict(), cfg).items() if k != "lm_head.weight"}
    missing, unexpected = ref.load_state_dict({**state, "score.weight": rm.score.weight.detach()}, strict=False)
    assert not missing and not unexpected
    # right-padded rows of different lengths: transformers reads the last token before the padding
    idx = torch.randint(1, 97, (3, 20), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([20, 13, 7])
    idx[torch.arange(20) >= lengths[:, None]] = 0
    with torch.no_grad():
        torch.testing.assert_close(rm.eval()(idx, lengths - 1), ref(idx).logits[:, 0], rtol=1e-4, atol=1e-4)


def test_a_fresh_head_scores_zero_and_the_loss_is_bradley_terry():
    rm = RewardModel(Transformer(ModelConfig(vocab_size=97, dim=32, n_layer=1, n_head=4, max_seq_len=16)))
    idx = torch.randint(0, 97, (2, 8))
    assert torch.equal(rm(idx, torch.tensor([7, 3])), torch.zeros(2))
    chosen, rejected = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.0])
    torch.testing.assert_close(pairwise_loss(chosen, rejected), -torch.log(1 / (1 + torch.exp(-(chosen - rejected)))))
    assert math.isclose(pairwise_loss(torch.zeros(1), torch.zeros(1)).item(), math.log(2), rel_tol=1e-6)


def test_centring_adds_the_pairs_squared_sum_and_leaves_the_rankings_gradient_alone():
    """--center-rewards: c (chosen + rejected)^2 pulls each pair's scores towards 0 together; the
    gradient along chosen - rejected (what ranks them) is Bradley-Terry's alone."""
    chosen = torch.tensor([3.0, -1.0, 0.5], requires_grad=True)
    rejected = torch.tensor([1.0, -4.0, 0.7], requires_grad=True)
    centred = pairwise_loss(chosen, rejected, center=0.1)
    torch.testing.assert_close(centred, pairwise_loss(chosen, rejected) + 0.1 * (chosen + rejected) ** 2)
    g_c, g_r = torch.autograd.grad(centred.sum(), (chosen, rejected))
    p_c, p_r = torch.autograd.grad(pairwise_loss(chosen, rejected).sum(), (chosen, rejected))
    torch.testing.assert_close(g_c - g_r, p_c - p_r)
    torch.testing.assert_close(g_c + g_r, p_c + p_r + 0.4 * (chosen + rejected).detach())  # p_c + p_r = 0
