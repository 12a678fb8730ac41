"""Online DPO on a tiny model: the policy samples, is scored, trains on best vs worst, and its mean
sample reward rises; the Online Merging Optimizer runs in the same loop; a resumed run repeats
the uninterrupted one exactly."""

import dataclasses
import json

import pytest

import qwen2.train.online as online
from qwen2.checkpoint.loader import Pretrained, save_pretrained
from qwen2.config import PRESETS
from qwen2.model import Qwen2ForCausalLM
from qwen2.train.recipe import RecipeError, load_recipe

RECIPE = """
name = "tiny-online"
seed = 0
[model]
init = "sft"
[data]
prompts = "prompts.jsonl"
val = "val.jsonl"
[train]
seq_len = 96
micro_batch_size = 4
grad_accum = 1
lr = {lr}
warmup_steps = 1
schedule = "constant"
weight_decay = 0.0
save_every = 2
log_every = 1
eval_every = 2
dtype = "float32"
threads = 1
[dpo]
beta = 0.5
[online]
k = 6
prompts_per_iteration = 6
steps_per_iteration = 2
temperature = 1.0
max_new_tokens = 8
{merge}
[[stage]]
name = "online"
steps = {steps}
"""


def a_share(records, replies, finish):
    """A reward a tiny random model can learn to raise: the share of ASCII letters in its reply."""
    return [sum(c.isascii() and c.isalpha() for c in text) / max(len(text), 1) for text in replies]


@pytest.fixture
def run_dir(tmp_path, byte_tokenizer, monkeypatch):
    config = dataclasses.replace(PRESETS["tiny"], vocab_size=260, eos_token_id=258)
    base = Qwen2ForCausalLM(config)
    base.init_weights(seed=0)
    save_pretrained(Pretrained(base, byte_tokenizer), tmp_path / "base")
    sft = Qwen2ForCausalLM(config)
    sft.init_weights(seed=1)  # stands in for the SFT model: a different point than the base
    save_pretrained(Pretrained(sft, byte_tokenizer), tmp_path / "sft")
    prompts = [{"messages": [{"role": "user", "content": f"say something about {w}"}], "answer": "0"}
               for w in ("cats", "rain", "maps", "tea", "jazz", "salt", "bats", "lamps")]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(p) for p in prompts), encoding="utf-8")
    val = [{"messages": [{"role": "user", "content": f"echo {w}"}, {"role": "assistant", "content": w}]}
           for w in ("one", "two", "three")]
    (tmp_path / "val.jsonl").write_text("\n".join(json.dumps(v) for v in val), encoding="utf-8")
    monkeypatch.setattr(online, "maths_reward", lambda: a_share)
    return tmp_path


def write_recipe(tmp_path, *, steps=16, lr=3e-3, merge=""):
    path = tmp_path / "online.toml"
    path.write_text(RECIPE.format(steps=steps, lr=lr, merge=merge), encoding="utf-8")
    return load_recipe(path)


def rewards_by_iteration(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    by_iteration = {}
    for r in records:
        if "sample_reward" in r:
            by_iteration[r["iteration"]] = r["sample_reward"]
    return [by_iteration[i] for i in sorted(by_iteration)], records


def test_online_dpo_raises_the_mean_sample_reward(run_dir):
    result = online.run_online(write_recipe(run_dir), run_dir / "run", progress=False)
    rewards, records = rewards_by_iteration(run_dir / "run")
    assert len(rewards) == 8
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.1, rewards
    assert any(r.get("pairs", 0) > 0 for r in records) and "sft_val_loss" in result["after"]
    assert (run_dir / "run" / "model" / "config.json").exists()


@pytest.mark.parametrize("mode", ["dare", "ties"])
def test_the_online_merging_optimizer_trains_in_the_same_loop(run_dir, mode):
    merge = f'merge = "{mode}"\nbase = "base"\nreserve_p = 0.5\nalpha = 0.001'
    online.run_online(write_recipe(run_dir, merge=merge), run_dir / mode, progress=False)
    rewards, _ = rewards_by_iteration(run_dir / mode)
    assert rewards[-1] > rewards[0], rewards


def test_a_resumed_run_samples_and_trains_exactly_as_an_uninterrupted_one(run_dir):
    recipe = write_recipe(run_dir, steps=8)
    online.run_online(recipe, run_dir / "whole", progress=False)
    online.run_online(recipe, run_dir / "cut", progress=False, stop_after=4)
    online.run_online(recipe, run_dir / "cut", progress=False)

    def lines(run):
        return [{k: v for k, v in json.loads(line).items() if not k.endswith(("_per_s", "seconds", "mfu"))}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert lines(run_dir / "cut") == lines(run_dir / "whole")


def test_a_prompt_without_room_for_a_reply_is_named_at_load(run_dir):
    from qwen2.data.readers import DataError

    (run_dir / "prompts.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "x" * 200}],
                                                       "answer": "1"}) + "\n")
    with pytest.raises(DataError, match="prompts.jsonl:1.*no room for a reply"):
        online.run_online(write_recipe(run_dir, steps=2), run_dir / "long", progress=False)


def test_bad_online_recipes_are_named(run_dir):
    with pytest.raises(RecipeError, match="base"):
        write_recipe(run_dir, merge='merge = "dare"')
    with pytest.raises(RecipeError, match="save_every"):
        (run_dir / "bad.toml").write_text(RECIPE.format(steps=4, lr=1e-3, merge="").replace("save_every = 2",
                                                                                           "save_every = 3"))
        load_recipe(run_dir / "bad.toml")
