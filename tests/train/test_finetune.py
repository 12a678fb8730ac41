"""SFT (loss only on assistant tokens, packing, resume), LoRA (exact at init, merge), DPO (raises
preference accuracy), on a tiny random model with the byte tokenizer."""

import dataclasses
import json

import pytest
import torch

from qwen2.checkpoint.loader import Pretrained, save_pretrained
from qwen2.config import PRESETS
from qwen2.model import Qwen2ForCausalLM
from qwen2.model.loss import IGNORE_INDEX
from qwen2.train.dpo import run_dpo
from qwen2.train.lora import LoRAConfig, adapters_disabled, apply_lora_, merge_lora_
from qwen2.train.recipe import load_recipe
from qwen2.train.sft import PackedConversations, load_conversations, run_sft

CONVERSATIONS = [
    [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w}!"}]
    for w in ("red", "green", "blue", "cyan", "pink", "gold")
] + [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
      {"role": "assistant", "content": "ciao"}]]

RECIPE = """
name = "tiny-{kind}"
seed = 0
[model]
init = "base"
[data]
{data}
[train]
seq_len = 96
micro_batch_size = 2
grad_accum = 1
lr = {lr}
warmup_steps = 1
schedule = "constant"
weight_decay = 0.0
save_every = 2
log_every = 1
eval_every = 1000
dtype = "float32"
threads = 1
{lora}
[[stage]]
name = "{kind}"
steps = {steps}
"""


@pytest.fixture
def base(tmp_path, byte_tokenizer):
    config = dataclasses.replace(PRESETS["tiny"], vocab_size=260, eos_token_id=258)
    model = Qwen2ForCausalLM(config)
    model.init_weights(seed=0)
    save_pretrained(Pretrained(model, byte_tokenizer), tmp_path / "base")
    return model


def write_recipe(tmp_path, kind, data, *, lr=3e-3, steps=6, lora=True):
    lora_table = "[lora]\nr = 4\nalpha = 8.0\n" if lora else ""
    path = tmp_path / f"{kind}.toml"
    path.write_text(RECIPE.format(kind=kind, data=data, lr=lr, steps=steps, lora=lora_table), encoding="utf-8")
    return load_recipe(path)


def test_only_assistant_tokens_carry_loss(tmp_path, byte_tokenizer):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"messages": m}) for m in CONVERSATIONS), encoding="utf-8")
    examples = load_conversations(path, byte_tokenizer)
    packed = PackedConversations(examples, seq_len=200, pad_id=256, seed=0)
    predicted = []
    for _ in range(len(examples)):
        rows = packed.rows(1)
        labels = rows.labels_BT[0]
        predicted.append(byte_tokenizer.decode(labels[labels != IGNORE_INDEX].tolist()))
        if packed.epoch:
            break
    text = "".join(predicted)
    for conversation in CONVERSATIONS:  # every assistant reply and its <|im_end|> is a target
        for m in conversation:
            if m["role"] == "assistant":
                assert m["content"] + "<|im_end|>" in text
    for forbidden in ("say ", "be brief", "bye", "system", "user", "assistant", "<|im_start|>"):
        assert forbidden not in text  # nothing of system/user turns or the headers
    # packing: several conversations per row, each its own document
    first = PackedConversations(examples, seq_len=200, pad_id=256, seed=0).rows(1)
    assert len(set(first.document_ids_BT[0].tolist())) > 2


def test_lora_is_exact_at_start_and_merges(byte_tokenizer):
    model = Qwen2ForCausalLM(dataclasses.replace(PRESETS["tiny"], vocab_size=260))
    model.init_weights(seed=0)
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        before = model(ids)
    trainable = apply_lora_(model, LoRAConfig(r=4, alpha=8.0), seed=0)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    with torch.no_grad():
        assert torch.equal(model(ids), before)  # B = 0: the base model exactly
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        adapted = model(ids)
        with adapters_disabled(model):
            assert torch.equal(model(ids), before)
    merge_lora_(model)
    assert not any("lora" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(ids), adapted, atol=1e-5, rtol=1e-5)


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def test_sft_learns_the_replies(tmp_path, base):
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"messages": m}) for m in CONVERSATIONS), encoding="utf-8")
    recipe = write_recipe(tmp_path, "sft", 'conversations = "c.jsonl"\nval = "c.jsonl"', lr=1e-2, steps=12, lora=False)
    result = run_sft(recipe, tmp_path / "full", progress=False)
    curve = losses(tmp_path / "full")
    assert curve[-1][1] < curve[0][1] * 0.7, curve
    assert result["eval"]["val_loss"] < curve[0][1] * 0.7


def test_sft_with_lora_resumes_exactly_and_exports_merged(tmp_path, base, byte_tokenizer):
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"messages": m}) for m in CONVERSATIONS), encoding="utf-8")
    recipe = write_recipe(tmp_path, "sft", 'conversations = "c.jsonl"\nval = "c.jsonl"', lr=3e-2, steps=8)
    result = run_sft(recipe, tmp_path / "whole", progress=False)
    curve = losses(tmp_path / "whole")
    assert curve[-1][1] < curve[0][1], curve  # the adapters train
    run_sft(recipe, tmp_path / "split", progress=False, stop_after=4)
    assert (tmp_path / "split" / "checkpoints" / "step_00000004" / "adapters.safetensors").exists()
    run_sft(recipe, tmp_path / "split", progress=False)
    assert losses(tmp_path / "split") == curve  # exact resume with adapters
    from qwen2.checkpoint import load_pretrained

    exported = load_pretrained(result["model"])  # merged: a plain Qwen2 directory
    assert not any("lora" in n for n, _ in exported.model.named_parameters())


def test_dpo_raises_preference_accuracy(tmp_path, base):
    pairs = [{"prompt": [{"role": "user", "content": f"pick {i}"}],
              "chosen": [{"role": "assistant", "content": "yes " * (1 + i % 3)}],
              "rejected": [{"role": "assistant", "content": "no " * (1 + i % 2)}]} for i in range(8)]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(p) for p in pairs), encoding="utf-8")
    for reference in ("precomputed", "on_the_fly"):
        recipe = write_recipe(tmp_path, "dpo", 'preferences = "p.jsonl"', lr=1e-2, steps=8)
        recipe = dataclasses.replace(recipe, dpo=dataclasses.replace(recipe.dpo, beta=0.5, reference=reference))
        result = run_dpo(recipe, tmp_path / reference, progress=False)
        assert result["accuracy_before"] == 0.0  # policy == reference: no pair is preferred yet
        assert result["accuracy_after"] >= 0.875, result
        records = [json.loads(line) for line in (tmp_path / reference / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["rewards/margin"] > 0 and records[-1]["loss"] < records[0]["loss"]


def test_bad_conversation_lines_are_named(tmp_path, byte_tokenizer):
    path = tmp_path / "c.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"c\.jsonl:1: no assistant turn"):
        load_conversations(path, byte_tokenizer)
    path.write_text('{"messages": [{"role": "robot", "content": "hi"}]}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"c\.jsonl:1: message 0 must be"):
        load_conversations(path, byte_tokenizer)
