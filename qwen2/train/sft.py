"""Supervised fine-tuning on ChatML conversations: loss on assistant tokens only, packed rows.

Each conversation (JSONL {"messages": [{"role": "system|user|assistant|tool", "content": ...}]})
is rendered with the model's chat template and masked by encode_chat_with_mask: only the bodies of
assistant turns (with their closing <|im_end|>) are predicted. Conversations are shuffled per
epoch (seeded) and packed greedily into rows of `seq_len` tokens, each one its own document
(attention and positions restart, qwen2.model.transformer); the rest of a row is padding that
carries no loss. A conversation longer than a row is cut to it (counted and reported).

Also the shared set-up of fine-tuning runs (`load_for_finetuning`): the init model in float32,
LoRA adapters if the recipe asks, the optimizer over what trains, and resume.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qwen2.data.readers import DataError, iter_jsonl
from qwen2.model import Qwen2ForCausalLM
from qwen2.model.loss import IGNORE_INDEX
from qwen2.tokenizer import Tokenizer, encode_chat_with_mask
from qwen2.tokenizer.chat import ROLES
from qwen2.train.data import EpochOrder
from qwen2.train.distributed import DistEnv
from qwen2.train.loop import flops_per_token, mean_loss
from qwen2.train.recipe import Recipe, RecipeError


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # the next token where it is an assistant token, else IGNORE_INDEX


@dataclass
class Rows:
    input_ids_BT: torch.Tensor
    labels_BT: torch.Tensor
    document_ids_BT: torch.Tensor


def read_jsonl(path: Path) -> list[tuple[str, dict]]:
    """(where, object) per non-blank line, at least one; errors name the file and line."""
    out = list(iter_jsonl(path))
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def pad_id(tokenizer: Tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def check_messages(messages: Any, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content", ""), (str, type(None))):
            raise DataError(f"{where}: message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {str(m)[:100]}")
    return messages


def shifted_labels(ids: list[int], mask: list[int]) -> list[int]:
    """Label of position i = ids[i + 1] if that token carries loss, else IGNORE_INDEX; last = IGNORE."""
    return [ids[i + 1] if mask[i + 1] else IGNORE_INDEX for i in range(len(ids) - 1)] + [IGNORE_INDEX]


def load_conversations(path: Path, tokenizer: Tokenizer) -> list[Example]:
    examples = []
    for where, obj in read_jsonl(path):
        messages = check_messages(obj.get("messages"), where)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant turn, so nothing to learn from")
        try:
            ids, mask = encode_chat_with_mask(tokenizer, messages)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
        examples.append(Example(ids, shifted_labels(ids, mask)))
    return examples


class PackedConversations:
    """Rows of `seq_len` from shuffled examples, one epoch after another, resumable."""

    def __init__(self, examples: list[Example], seq_len: int, pad_id: int, seed: int) -> None:
        self.examples, self.seq_len, self.pad_id = examples, seq_len, pad_id
        self.order = EpochOrder(len(examples), seed)
        self.truncated = sum(len(e.input_ids) > seq_len for e in examples)

    @property
    def epoch(self) -> int:
        return self.order.epoch

    def row(self) -> tuple[list[int], list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        docs: list[int] = []
        doc = 0
        while True:
            example = self.examples[self.order.peek()]
            n = min(len(example.input_ids), self.seq_len)
            if ids and len(ids) + n > self.seq_len:
                break
            self.order.take()
            ids += example.input_ids[:n]
            labels += example.labels[:n - 1] + [IGNORE_INDEX]  # a cut conversation predicts nothing past the cut
            docs += [doc] * n
            doc += 1
            if len(ids) == self.seq_len:
                break
        pad = self.seq_len - len(ids)
        return ids + [self.pad_id] * pad, labels + [IGNORE_INDEX] * pad, docs + [doc] * pad

    def rows(self, n: int) -> Rows:
        built = [self.row() for _ in range(n)]
        return Rows(*(torch.tensor([r[k] for r in built]) for k in range(3)))

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)


def split_rows(rows: Rows, micro: int, env: DistEnv) -> list[Rows]:
    mine = slice(env.rank, None, env.world_size)
    ids, labels, docs = rows.input_ids_BT[mine], rows.labels_BT[mine], rows.document_ids_BT[mine]
    return [Rows(ids[i:i + micro], labels[i:i + micro], docs[i:i + micro]) for i in range(0, len(ids), micro)]


class SFTTask:
    def __init__(self, recipe: Recipe, train: PackedConversations, val: list[Rows], autocast: Any) -> None:
        self.recipe, self.data, self.val, self.autocast = recipe, train, val, autocast

    def prepare_step(self, model: Qwen2ForCausalLM, step: int) -> None:
        pass

    def batches(self, step: int, env: DistEnv) -> list[Rows]:
        t = self.recipe.train
        return split_rows(self.data.rows(t.micro_batch_size * t.grad_accum * env.world_size), t.micro_batch_size, env)

    def count(self, micro: Rows) -> float:
        return float((micro.labels_BT != IGNORE_INDEX).sum())

    def loss(self, model: torch.nn.Module, micro: Rows) -> tuple[torch.Tensor, dict[str, float]]:
        return model(micro.input_ids_BT, document_ids_BT=micro.document_ids_BT, labels_BT=micro.labels_BT,
                     loss_chunk=self.recipe.train.loss_chunk), {}

    def should_evaluate(self, step: int) -> bool:
        return bool(self.val) and step % self.recipe.train.eval_every == 0

    def evaluate(self, model: Qwen2ForCausalLM, step: int) -> dict[str, float]:
        if not self.val:
            return {}
        loss = mean_loss(self, model, self.val, self.autocast)
        return {"val_loss": loss, "val_ppl": math.exp(loss)}

    def describe(self, step: int) -> dict[str, Any]:
        return {"stage": "sft", "epoch": self.data.order.progress}

    def flops_per_unit(self, model: Qwen2ForCausalLM) -> float:
        # per loss token: the whole row is computed for the assistant tokens it holds (approximate)
        return flops_per_token(model.config, self.recipe.train.seq_len)

    def state_dict(self) -> dict:
        return {"data": self.data.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.data.load_state_dict(state["data"])


# ----------------------------------------------------------------------------------------------------
# Shared set-up of fine-tuning runs


def load_for_finetuning(recipe: Recipe):
    """(pretrained, number of trainable parameters): the init model in float32, with LoRA if asked."""
    from qwen2.checkpoint import load_pretrained
    from qwen2.train.lora import LoRAConfig, apply_lora_, parse_targets

    if not recipe.model.init:
        raise RecipeError(f"{recipe.path}: [model] init = the model to fine-tune (a directory, .gguf, hub id or 'demo')")
    init = recipe.model.init
    if init == "demo":
        name = None  # the embedded default model
    elif Path(init).is_absolute() or (recipe.path.parent / init).exists():
        name = recipe.resolve(init, Path("."))
    else:
        name = init  # a hub id
    pretrained = load_pretrained(name, dtype=torch.float32)
    model = pretrained.model
    model.model.gradient_checkpointing = recipe.train.activation_checkpointing
    if recipe.lora is not None:
        lora = LoRAConfig(r=recipe.lora.r, alpha=recipe.lora.alpha, dropout=recipe.lora.dropout,
                          targets=parse_targets(recipe.lora.targets))
        trainable = apply_lora_(model, lora, seed=recipe.seed)
    else:
        trainable = sum(p.numel() for p in model.parameters())
    return pretrained, trainable


def finish(pretrained, recipe: Recipe, out: Path, steps: int, env: DistEnv) -> Path | None:
    """After the last step (rank 0): the fine-tuned model as a Hugging Face directory (adapters
    merged) and the plots; None if the run stopped early."""
    from qwen2.checkpoint.loader import save_pretrained
    from qwen2.train.lora import lora_layers, merge_lora_
    from qwen2.train.plots import plot_metrics

    if steps < recipe.total_steps or not env.is_main:
        return None
    if any(True for _ in lora_layers(pretrained.model)):
        merge_lora_(pretrained.model)
    save_pretrained(pretrained, out / "model", dtype=torch.float32)
    plot_metrics(out / "metrics.jsonl", out)
    return out / "model"


def validation_rows(recipe: Recipe, out: Path, tokenizer: Tokenizer) -> list[Rows]:
    """The fixed validation batches of `[data] val` (conversations), or none: packed like training,
    at most `eval_batches` of them."""
    if not recipe.data.val:
        return []
    t = recipe.train
    data = PackedConversations(load_conversations(recipe.resolve(recipe.data.val, out), tokenizer), t.seq_len,
                               pad_id(tokenizer), 0)
    batches = max(1, min(t.eval_batches, math.ceil(len(data.examples) / t.micro_batch_size)))
    return [data.rows(t.micro_batch_size) for _ in range(batches)]


def run_sft(recipe: Recipe, out: str | Path, *, progress: bool = True, stop_after: int | None = None) -> dict:
    from qwen2.train.loop import autocast_for, make_optimizer, resume, start_run, train

    if not recipe.data.conversations:
        raise RecipeError(f"{recipe.path}: [data] conversations = a JSONL file of {{\"messages\": [...]}}")
    out, env = start_run(recipe, out)
    pretrained, trainable = load_for_finetuning(recipe)
    tokenizer, model = pretrained.tokenizer, pretrained.model
    t = recipe.train
    examples = load_conversations(recipe.resolve(recipe.data.conversations, out), tokenizer)
    pad = pad_id(tokenizer)
    data = PackedConversations(examples, t.seq_len, pad, recipe.seed)
    val = validation_rows(recipe, out, tokenizer)
    if env.is_main:
        print(f"SFT: {len(examples)} conversations ({data.truncated} cut to {t.seq_len} tokens), "
              f"{trainable / 1e6:.2f}M trainable parameters", file=sys.stderr, flush=True)
    optimizer = make_optimizer(model, recipe)
    task = SFTTask(recipe, data, val, autocast_for(recipe))
    step, units = resume(out, model, optimizer, task)
    result = train(task, model, optimizer, recipe, out, env, start_step=step, units=units, progress=progress,
                   stop_after=stop_after, unit_name="loss_tokens")
    exported = finish(pretrained, recipe, out, result.steps, env)
    return {"steps": result.steps, "seconds": result.seconds, "eval": result.last_eval, "model": exported,
            "trainable": trainable}
