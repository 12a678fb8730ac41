"""Reward-model training on preference pairs (the same JSONL as DPO) with the Bradley-Terry loss.

The model is the policy's backbone with a scalar head (qwen2.model.reward): `[model] init` is a
causal LM (its LM head is dropped and a fresh head added) or an existing reward model directory.
Each side of a pair (prompt + reply, through the chat template) gets one reward, read at its last
token; the loss is -log sigmoid(r_chosen - r_rejected). With `[lora]` only the adapters and the
head train. Accuracy (share of pairs ranked right) is reported on the training pairs and, with
`[data] val`, on held-out pairs, before and after. The export in model/ is a Hugging Face
Qwen2ForSequenceClassification directory (loads with load_pretrained and with transformers).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch

from qwen2.model.reward import Qwen2RewardModel
from qwen2.train.dpo import Pair, PairTask, load_preferences
from qwen2.train.losses import bradley_terry_loss
from qwen2.train.recipe import Recipe, RecipeError


def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and their attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def pair_rewards(model: Qwen2RewardModel, pairs: list[Pair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards (chosen (B,), rejected (B,)) in one forward over 2B rows."""
    ids, mask = pad_rows([p.chosen[0] for p in pairs] + [p.rejected[0] for p in pairs], pad_id)
    rewards = model(ids, attention_mask_BS=mask)
    return rewards[:len(pairs)], rewards[len(pairs):]


@torch.no_grad()
def ranking_accuracy(model: Qwen2RewardModel, pairs: list[Pair], pad_id: int, batch: int = 8) -> float:
    """Share of pairs whose chosen reply gets the higher reward."""
    was_training = model.training
    model.eval()
    wins = 0
    for i in range(0, len(pairs), batch):
        chosen, rejected = pair_rewards(model, pairs[i:i + batch], pad_id)
        wins += int((chosen > rejected).sum())
    model.train(was_training)
    return wins / len(pairs)


class RewardTask(PairTask):
    stage = "reward"

    def __init__(self, recipe: Recipe, pairs: list[Pair], val: list[Pair], pad_id: int, autocast: Any) -> None:
        super().__init__(recipe, pairs, pad_id)
        self.val, self.autocast = val, autocast

    def loss(self, model: torch.nn.Module, micro: list[Pair]) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = pair_rewards(model, micro, self.pad_id)
        losses, metrics = bradley_terry_loss(chosen, rejected)
        n = len(micro)
        return losses.sum(), {k: float(v) * n for k, v in metrics.items()}

    def should_evaluate(self, step: int) -> bool:
        return bool(self.val) and step % self.recipe.train.eval_every == 0

    def evaluate(self, model: Qwen2RewardModel, step: int) -> dict[str, float]:
        with self.autocast():
            return {"val_accuracy": ranking_accuracy(model, self.val, self.pad_id)}


def run_reward(recipe: Recipe, out: str | Path, *, progress: bool = True, stop_after: int | None = None) -> dict:
    from qwen2.train.loop import autocast_for, make_optimizer, resume, start_run, train
    from qwen2.train.sft import finish, load_for_finetuning, pad_id

    if not recipe.data.preferences:
        raise RecipeError(f"{recipe.path}: [data] preferences = a JSONL file of {{prompt, chosen, rejected}}")
    out, env = start_run(recipe, out)
    pretrained, trainable = load_for_finetuning(recipe)
    tokenizer = pretrained.tokenizer
    pad = pad_id(tokenizer)
    if not isinstance(pretrained.model, Qwen2RewardModel):  # a causal LM: its backbone, a new head
        reward = Qwen2RewardModel.from_causal_lm(pretrained.model, pad_token_id=pad, seed=recipe.seed)
        pretrained = dataclasses.replace(pretrained, model=reward, generation_config={})
    model = pretrained.model
    model.score.weight.requires_grad_(True)  # with LoRA too: the head is new
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    pairs = load_preferences(recipe.resolve(recipe.data.preferences, out), tokenizer, recipe.train.seq_len)
    val = load_preferences(recipe.resolve(recipe.data.val, out), tokenizer, recipe.train.seq_len) if recipe.data.val else []
    autocast = autocast_for(recipe)
    if env.is_main:
        print(f"reward model: {len(pairs)} training pairs, {len(val)} held-out, {trainable / 1e6:.2f}M trainable "
              f"parameters", file=sys.stderr, flush=True)
    optimizer = make_optimizer(model, recipe)
    task = RewardTask(recipe, pairs, val, pad, autocast)
    step, units = resume(out, model, optimizer, task)
    with autocast():
        before = {"train": ranking_accuracy(model, pairs, pad), "val": ranking_accuracy(model, val, pad) if val else None} \
            if step == 0 else None
    result = train(task, model, optimizer, recipe, out, env, start_step=step, units=units, progress=progress,
                   stop_after=stop_after, unit_name="pairs")
    with autocast():
        after = {"train": ranking_accuracy(model, pairs, pad), "val": ranking_accuracy(model, val, pad) if val else None}
    exported = finish(pretrained, recipe, out, result.steps, env)
    return {"steps": result.steps, "seconds": result.seconds, "accuracy_before": before, "accuracy_after": after,
            "model": exported, "trainable": trainable}
