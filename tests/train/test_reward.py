"""Reward model training: the Bradley-Terry loss, a tiny model learning a preference it can see, the
export as a Qwen2ForSequenceClassification directory, exact resume."""

import dataclasses
import json
import math

import pytest
import torch

from qwen2.checkpoint.loader import Pretrained, save_pretrained
from qwen2.config import PRESETS
from qwen2.model import Qwen2ForCausalLM
from qwen2.model.reward import Qwen2RewardModel
from qwen2.train.losses import bradley_terry_loss
from qwen2.train.recipe import load_recipe
from qwen2.train.reward import run_reward

RECIPE = """
name = "tiny-reward"
seed = 0
[model]
init = "base"
[data]
preferences = "train.jsonl"
val = "val.jsonl"
[train]
seq_len = 96
micro_batch_size = 4
grad_accum = 1
lr = {lr}
warmup_steps = 1
schedule = "constant"
weight_decay = 0.0
save_every = 10
log_every = 1
eval_every = 10
dtype = "float32"
threads = 1
{lora}
[[stage]]
name = "reward"
steps = {steps}
"""

WORDS = ["apple", "river", "stone", "cloud", "maple", "tiger", "piano", "candle", "forest", "ocean", "garden",
         "silver", "window", "planet", "bridge", "lantern", "harbor", "meadow", "velvet", "comet"]


def pairs(words):
    """The chosen reply is polite ("please"), the rejected one curt; the rest is shared noise."""
    return [{"prompt": [{"role": "user", "content": f"ask for the {w}"}],
             "chosen": [{"role": "assistant", "content": f"{w}, please"}],
             "rejected": [{"role": "assistant", "content": f"{w}. now"}]} for w in words]


@pytest.fixture
def run_dir(tmp_path, byte_tokenizer):
    config = dataclasses.replace(PRESETS["tiny"], vocab_size=260, eos_token_id=258)
    model = Qwen2ForCausalLM(config)
    model.init_weights(seed=0)
    save_pretrained(Pretrained(model, byte_tokenizer), tmp_path / "base")
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(p) for p in pairs(WORDS[:14])), encoding="utf-8")
    (tmp_path / "val.jsonl").write_text("\n".join(json.dumps(p) for p in pairs(WORDS[14:])), encoding="utf-8")
    return tmp_path


def write_recipe(tmp_path, *, lora: bool, steps: int = 30, lr: float = 3e-3):
    path = tmp_path / "reward.toml"
    path.write_text(RECIPE.format(lr=lr, steps=steps, lora="[lora]\nr = 8\nalpha = 16.0\n" if lora else ""),
                    encoding="utf-8")
    return load_recipe(path)


def test_bradley_terry_loss_values():
    losses, metrics = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-1)), math.log1p(math.exp(2))])
    assert float(metrics["reward/accuracy"]) == 0.5
    margin, _ = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=torch.tensor([1.0]))
    assert float(margin) == pytest.approx(math.log(2))


@pytest.mark.parametrize("lora", [False, True])
def test_a_tiny_reward_model_learns_a_visible_preference(run_dir, lora):
    result = run_reward(write_recipe(run_dir, lora=lora, lr=3e-3 if not lora else 1e-2), run_dir / "run",
                        progress=False)
    assert result["accuracy_after"]["val"] == 1.0 and result["accuracy_after"]["train"] == 1.0, result
    assert result["accuracy_before"]["val"] < 1.0  # it was not there to begin with
    from qwen2.checkpoint.safetensors import load_hf_model

    exported = load_hf_model(result["model"], dtype=torch.float32)
    assert isinstance(exported, Qwen2RewardModel)
    config = json.loads((result["model"] / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForSequenceClassification"] and config["pad_token_id"] == 256
    if lora:
        assert result["trainable"] < 0.2 * sum(p.numel() for p in exported.parameters())


def test_reward_training_resumes_exactly(run_dir):
    recipe = write_recipe(run_dir, lora=False, steps=12)
    run_reward(recipe, run_dir / "whole", progress=False)
    run_reward(recipe, run_dir / "cut", progress=False, stop_after=10)  # checkpoint at step 10
    run_reward(recipe, run_dir / "cut", progress=False)

    def losses(d):
        return [r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    assert losses(run_dir / "cut") == losses(run_dir / "whole")
