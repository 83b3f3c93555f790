"""
The reward model of DeepSpeed-Chat's step 2: the decoder with a scalar head instead of the LM
head's vocabulary, trained on preference pairs to score a chosen reply above a rejected one.

    score(x, y) = w . h_last            h_last (C,): the final hidden state at the reply's end token
    loss = -log sigmoid(score(x, y_w) - score(x, y_l))          (Bradley-Terry, pairwise)

Reading the score at the end token means the whole prompt and reply have been seen (attention is
causal). The layout is transformers' LlamaForSequenceClassification: the decoder's weights under
their usual names and `score.weight` (1, C) with no bias, so a saved reward model loads there with
num_labels 1 and gives the same scores (tests/test_reward.py). Step 3 (PPO) reads its rewards here.

    RewardModel(sft_model)(idx, last) -> (B,) scores  last (B,): index of each row's end token
    pairwise_loss(chosen, rejected, center) -> (B,)
    ValueModel.from_reward_model(rm)(idx) -> (B, T) values: step 3's critic
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanosft.model import Transformer


class RewardModel(nn.Module):
    """`model`: the decoder (a Transformer, e.g. the SFT model, whose LM head it drops) -> a scorer."""

    def __init__(self, model: Transformer):
        super().__init__()
        model.lm_head = None  # (its vocabulary is not needed to score; a tied head is the embedding anyway)
        self.model, self.cfg = model, model.cfg  # (cfg: the shape, as a Transformer tells it)
        self.score = nn.Linear(model.cfg.dim, 1, bias=False)  # as LlamaForSequenceClassification's
        nn.init.zeros_(self.score.weight)  # every reply scores 0 until trained

    def forward(self, idx, last=None, pos=None, doc=None):
        """idx (B, T), last (B,) -> scores (B,), in fp32. Without `last`, every row is read at its last
        column (rows that end at their end token, as a plain forward on one reply)."""
        h = self.model.hidden(idx, pos, doc)  # (B, T, C)
        if last is None:
            last = torch.full((idx.shape[0],), idx.shape[1] - 1, device=idx.device)
        at_end = h[torch.arange(idx.shape[0], device=idx.device), last]  # (B, C)
        return self.score(at_end).squeeze(-1).float()  # (B,)


class ValueModel(RewardModel):
    """The critic of step 3 (ppo.py): a reward model read at every position, V_t, the return
    expected from there on. Started from the trained reward model, as DeepSpeed-Chat starts it:
    its first values are the reward model's opinion of each prefix."""

    @classmethod
    def from_reward_model(cls, rm):
        critic = cls(rm.model)
        critic.score.weight.data.copy_(rm.score.weight.data)
        return critic

    def forward(self, idx, pos=None, doc=None):
        """idx (B, T) -> values (B, T), in fp32."""
        return self.score(self.model.hidden(idx, pos, doc)).squeeze(-1).float()


def pairwise_loss(chosen, rejected, center=0.0):
    """Scores (B,) of the chosen and the rejected reply of each pair -> the loss of each pair (B,).
    center: the weight of (chosen + rejected)^2 (Eisenstein et al., 2023; TRL's
    center_rewards_coefficient). The pairwise term sees only differences, so each prompt may get an
    offset of its own; PPO's critic then has to learn those offsets before its advantages carry the
    difference between a good and a bad reply. Centring each pair at 0 removes them."""
    return -F.logsigmoid(chosen - rejected) + center * (chosen + rejected) ** 2

