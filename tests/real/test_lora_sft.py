"""LoRA SFT on the real 0.5B demo model fits and trains on this CPU; the merged export is a plain
Qwen2 directory that loads and still answers."""

import json
from pathlib import Path

import torch

from qwen2.train.recipe import load_recipe
from qwen2.train.sft import run_sft

RECIPE = """
name = "lora-sft-demo"
[model]
init = "{init}"
[data]
conversations = "c.jsonl"
[train]
seq_len = 128
micro_batch_size = 2
lr = 1e-3
warmup_steps = 1
schedule = "constant"
save_every = 2
log_every = 1
dtype = "bfloat16"
[lora]
r = 8
alpha = 16.0
[[stage]]
name = "sft"
steps = 3
"""

# One fact the model is taught: a made-up code word, so success is not prior knowledge.
TEACH = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "The code word is PELICAN-42."}]}
         for q in ("What is the code word?", "Tell me the code word.", "Code word, please?", "Which code word?")]


def test_lora_sft_on_the_demo_model(tmp_path, demo_path):
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(c) for c in TEACH), encoding="utf-8")
    (tmp_path / "r.toml").write_text(RECIPE.format(init=demo_path), encoding="utf-8")
    result = run_sft(load_recipe(tmp_path / "r.toml"), tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert result["trainable"] < 0.02 * 494e6  # adapters only
    assert losses[-1] < losses[0] * 0.7, losses  # it learns the reply
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert (checkpoint / "adapters.safetensors").stat().st_size < 40e6  # not the 2 GB base
    from qwen2.checkpoint import load_pretrained
    from qwen2.inference import SamplingParams, generate_text
    from qwen2.tokenizer import encode_chat

    tuned = load_pretrained(Path(result["model"]), dtype=torch.bfloat16)
    ids = encode_chat(tuned.tokenizer, [{"role": "user", "content": "What is the code word?"}], add_generation_prompt=True)
    reply = generate_text(tuned.model, tuned.tokenizer, ids, SamplingParams(max_new_tokens=16)).text
    assert "PELICAN" in reply, reply
