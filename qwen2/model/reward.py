"""The reward model: the Qwen2 backbone with a scalar head (transformers' Qwen2ForSequenceClassification
with one label, the layout public Qwen2 reward models ship in).

The reward of a sequence is `score(h)` at its last real token: the final hidden state after the
whole prompt and reply. Parameter names are transformers' (`model.*`, `score.weight`), and
config.json says `"architectures": ["Qwen2ForSequenceClassification"]` with one label, so a saved
reward model loads in transformers as it is, and theirs load here.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from qwen2.config import Qwen2Config
from qwen2.model.transformer import Qwen2ForCausalLM, Qwen2Model

ARCHITECTURE = "Qwen2ForSequenceClassification"


def reward_config(config: Qwen2Config, pad_token_id: int | None = None) -> Qwen2Config:
    """The config of a reward model on `config`'s backbone: one label, the head's architecture,
    a pad token (transformers finds each row's last real token by it)."""
    extra = {**config.extra, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
    pad = pad_token_id if pad_token_id is not None else config.pad_token_id
    return dataclasses.replace(config, architectures=[ARCHITECTURE], pad_token_id=pad, extra=extra)


def is_reward_config(config: Qwen2Config) -> bool:
    return ARCHITECTURE in (config.architectures or [])


class Qwen2RewardModel(nn.Module):
    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        labels = len(config.extra.get("id2label") or {"0": None})
        if labels != 1:
            raise ValueError(f"a reward model has one label; this config has {labels} (id2label)")
        self.config = config
        self.model = Qwen2Model(config)
        self.score = nn.Linear(config.hidden_size, 1, bias=False)

    @classmethod
    def from_causal_lm(cls, lm: Qwen2ForCausalLM, *, pad_token_id: int | None = None, seed: int = 0) -> "Qwen2RewardModel":
        """A reward model sharing `lm`'s backbone (the LM head is dropped), its head N(0, initializer_range)."""
        with torch.device("meta"):
            reward = cls(reward_config(lm.config, pad_token_id))
        reward.model = lm.model
        generator = torch.Generator().manual_seed(seed)
        weight = torch.empty(1, lm.config.hidden_size).normal_(0.0, lm.config.initializer_range, generator=generator)
        reward.score = nn.Linear(lm.config.hidden_size, 1, bias=False, device=lm.device, dtype=lm.dtype)
        with torch.no_grad():
            reward.score.weight.copy_(weight)
        return reward

    def tie_weights(self) -> None:
        """Nothing is tied (there is no LM head); here for the checkpoint loader."""

    def forward(self, input_ids_BT: torch.Tensor, *, attention_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards (B,) in float32, read at each row's last real token (any padding side)."""
        h_BTD = self.model(input_ids_BT, attention_mask_BS=attention_mask_BS)
        B, T = input_ids_BT.shape
        if attention_mask_BS is None:
            last_B = torch.full((B,), T - 1, device=input_ids_BT.device)
        else:
            real_BT = attention_mask_BS[:, -T:].bool()
            if not bool(real_BT.any(dim=1).all()):
                raise ValueError("every row needs at least one real token")
            last_B = (torch.arange(T, device=input_ids_BT.device) * real_BT).argmax(dim=1)
        h_BD = h_BTD[torch.arange(B, device=h_BTD.device), last_B]
        return self.score(h_BD).squeeze(-1).float()

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype
