"""Pre-training from a recipe on a tiny config: stages (long context recorded in config.json), exact
resume after an interruption (also SIGKILL), checkpoints loadable by transformers, recipe errors named."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qwen2.data.readers import Document
from qwen2.data.shards import pack_documents
from qwen2.train.checkpointing import latest_checkpoint
from qwen2.train.pretrain import run
from qwen2.train.recipe import RecipeError, load_recipe

RECIPE = """
name = "tiny-test"
seed = 3

[model]
preset = "tiny"
hidden_size = 64
intermediate_size = 128
num_hidden_layers = 2
max_position_embeddings = 32
rope_theta = 10000.0

[tokenizer]
path = "tok"

[data]
sources = {{ text = "shards/train" }}
val = "shards/val"

[train]
seq_len = 32
micro_batch_size = 2
grad_accum = 2
lr = 3e-3
warmup_steps = 2
eval_every = 4
eval_batches = 2
save_every = {save_every}
keep_last = 2
log_every = 1
dtype = "bfloat16"
threads = 1

[[stage]]
name = "general"
steps = {general}

[[stage]]
name = "long-context"
steps = 2
seq_len = 64
micro_batch_size = 1
rope_theta = 100000.0
max_position_embeddings = 64
"""


def make_recipe(root: Path, byte_tokenizer, *, general: int = 6, save_every: int = 1) -> Path:
    if not (root / "tok").exists():
        byte_tokenizer.save(root / "tok")
        docs = [Document(id=str(i), text=f"line {i}: the quick brown fox {'jumps ' * (i % 5)}over the lazy dog.")
                for i in range(300)]
        pack_documents(docs, byte_tokenizer, root / "shards", val_fraction=0.1)
    path = root / "recipe.toml"
    path.write_text(RECIPE.format(general=general, save_every=save_every), encoding="utf-8")
    return path


def losses(run_dir: Path) -> list[tuple]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in records]


def test_stages_resume_and_export(tmp_path, byte_tokenizer):
    recipe = load_recipe(make_recipe(tmp_path, byte_tokenizer))
    whole = run(recipe, tmp_path / "whole", progress=False)
    assert whole.steps == 8 and whole.val_loss is not None and whole.unigram_loss is not None
    config = json.loads((tmp_path / "whole" / "model" / "config.json").read_text())
    assert config["rope_theta"] == 100000.0 and config["max_position_embeddings"] == 64  # the long-context stage
    # interrupted after 3 steps, then again inside the long-context stage, then finished
    assert run(recipe, tmp_path / "split", progress=False, stop_after=3).steps == 3
    assert run(recipe, tmp_path / "split", progress=False, stop_after=4).steps == 7
    (tmp_path / "split" / "checkpoints" / ".step_00000008.tmp").mkdir()  # a save killed half-way
    run(recipe, tmp_path / "split", progress=False)
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")  # bit for bit, step for step
    # keep_last = 2, and the half-written save is gone
    assert sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir()) == ["step_00000007", "step_00000008"]
    assert (tmp_path / "whole" / "loss.png").exists() and (tmp_path / "whole" / "training.png").exists()
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return  # optional
    events = EventAccumulator(str(tmp_path / "split" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 9))  # resumed runs: no duplicates


def test_final_model_loads_in_transformers_with_the_same_logits(tmp_path, byte_tokenizer):
    transformers = pytest.importorskip("transformers")
    from qwen2.checkpoint import load_pretrained

    recipe = load_recipe(make_recipe(tmp_path, byte_tokenizer, general=2))
    run(recipe, tmp_path / "run", progress=False)
    ours = load_pretrained(tmp_path / "run" / "model")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    ids = torch.tensor([ours.tokenizer.encode("the quick brown fox")])
    with torch.no_grad():
        torch.testing.assert_close(ours.model(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)


def test_sigkill_mid_training_then_resume_matches(tmp_path, byte_tokenizer):
    path = make_recipe(tmp_path, byte_tokenizer, general=40, save_every=5)
    reference = run(load_recipe(path), tmp_path / "reference", progress=False)
    assert reference.steps == 42
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "qwen2", "train", "pretrain", "--recipe", str(path), "--out", str(tmp_path / "killed")]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "killed" / "checkpoints" / "step_00000010").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted_at = latest_checkpoint(tmp_path / "killed")
    assert interrupted_at is not None and interrupted_at.name < "step_00000042"
    assert subprocess.run(command, env=env, capture_output=True).returncode == 0
    assert losses(tmp_path / "killed") == losses(tmp_path / "reference")


@pytest.mark.parametrize("change,message", [
    ('lr = 3e-3', 'lr = "fast"'), ('warmup_steps = 2', 'warmup_stepz = 2'),
    ('name = "general"', 'name = "general"\nmixture = { other = 1.0 }'), ('dtype = "bfloat16"', 'dtype = "fp8"'),
])
def test_recipe_mistakes_are_named(tmp_path, byte_tokenizer, change, message):
    path = make_recipe(tmp_path, byte_tokenizer)
    path.write_text(path.read_text().replace(change, message), encoding="utf-8")
    expected = {'lr = "fast"': r"\[train\]\.lr: 'fast' is not float", "warmup_stepz = 2": r"unknown key\(s\) \['warmup_stepz'\]",
                'dtype = "fp8"': "dtype must be bfloat16 or float32"}.get(message, "mixes unknown sources")
    with pytest.raises(RecipeError, match=expected):
        load_recipe(path)


def test_sigkill_in_the_middle_of_a_save_leaves_the_previous_checkpoint_intact(tmp_path, byte_tokenizer):
    path = make_recipe(tmp_path, byte_tokenizer, general=13, save_every=5)
    reference = run(load_recipe(path), tmp_path / "reference", progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QWEN2_KILL_IN_SAVE": "10"}
    command = [sys.executable, "-m", "qwen2", "train", "pretrain", "--recipe", str(path), "--out", str(tmp_path / "run")]
    killed = subprocess.run(command, env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / ".step_00000010.tmp").is_dir()  # the save that was cut short
    assert latest_checkpoint(tmp_path / "run").name == "step_00000005"  # the one before, intact
    assert not (checkpoints / ".step_00000010.tmp").exists()  # and the half save is cleared away
    del env["QWEN2_KILL_IN_SAVE"]
    assert subprocess.run(command, env=env, capture_output=True).returncode == 0
    assert reference.steps == 15 and losses(tmp_path / "run") == losses(tmp_path / "reference")
