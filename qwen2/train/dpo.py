"""Offline DPO from preference pairs (JSONL {"prompt": [messages], "chosen": [messages], "rejected": [messages]}).

Each side is the prompt conversation followed by its reply turns, rendered with the chat template;
only the reply's assistant tokens count toward the sequence log-probability. The reference policy
is the model as it starts: its log-probs are computed once before training ("precomputed", kept in
memory and recomputed identically on resume) or at every step ("on_the_fly"; with LoRA the base
model with adapters switched off, otherwise a frozen copy). Loss and metrics: qwen2.train.losses.dpo_loss.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from qwen2.data.readers import DataError
from qwen2.model import Qwen2ForCausalLM
from qwen2.model.loss import IGNORE_INDEX
from qwen2.tokenizer import Tokenizer, encode_chat, encode_chat_with_mask
from qwen2.train.data import EpochOrder
from qwen2.train.distributed import DistEnv
from qwen2.train.loop import flops_per_token
from qwen2.train.losses import dpo_loss, sequence_logps
from qwen2.train.recipe import Recipe, RecipeError
from qwen2.train.sft import check_messages, read_jsonl, shifted_labels


@dataclass
class Pair:
    index: int
    chosen: tuple[list[int], list[int]]  # (ids, labels)
    rejected: tuple[list[int], list[int]]


def encode_reply(tokenizer: Tokenizer, prompt: list[dict], reply: list[dict], where: str,
                 max_len: int) -> tuple[list[int], list[int]]:
    """(ids, labels) of prompt + reply, loss only on the reply's assistant tokens."""
    ids, mask = encode_chat_with_mask(tokenizer, prompt + reply)
    prefix = encode_chat(tokenizer, prompt, add_generation_prompt=False)
    if ids[:len(prefix)] != prefix:  # ChatML templates concatenate turns, so the prompt is a prefix
        raise DataError(f"{where}: the chat template renders the prompt differently alone and with the reply")
    mask = [0] * len(prefix) + mask[len(prefix):]
    if len(ids) > max_len:
        ids, mask = ids[:max_len], mask[:max_len]
    if not any(mask[1:]):
        raise DataError(f"{where}: the reply has no assistant tokens within {max_len} tokens")
    return ids, shifted_labels(ids, mask)


def load_preferences(path: Path, tokenizer: Tokenizer, max_len: int) -> list[Pair]:
    pairs = []
    for i, (where, obj) in enumerate(read_jsonl(path)):
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in obj]
        if missing:
            raise DataError(f"{where}: missing {missing} (a pair is prompt, chosen and rejected message lists)")
        prompt = check_messages(obj["prompt"], f"{where} prompt")
        sides = []
        for key in ("chosen", "rejected"):
            reply = check_messages(obj[key], f"{where} {key}")
            if not any(m["role"] == "assistant" for m in reply):
                raise DataError(f"{where}: {key} has no assistant turn")
            sides.append(encode_reply(tokenizer, prompt, reply, f"{where} {key}", max_len))
        pairs.append(Pair(i, sides[0], sides[1]))
    return pairs


def pad_labelled(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels) rows right-padded to one width (labels with IGNORE_INDEX)."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([r[0] + [pad_id] * (width - len(r[0])) for r in rows])
    labels = torch.tensor([r[1] + [IGNORE_INDEX] * (width - len(r[1])) for r in rows])
    return ids, labels


def pair_logps(model: torch.nn.Module, pairs: list[Pair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs (chosen (B,), rejected (B,)) in one forward over 2B right-padded rows
    (right padding changes nothing before it under a causal mask)."""
    ids, labels = pad_labelled([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    logps = sequence_logps(model(ids), labels)
    return logps[:len(pairs)], logps[len(pairs):]


def reference_logps(reference: Any, micro: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference policy's (chosen, rejected) log-probs: from the precomputed tables, or computed now."""
    if callable(reference):
        return reference(micro)
    index = torch.tensor([p.index for p in micro])
    return reference[0][index], reference[1][index]


class PairTask:
    """What every task over preference pairs shares (DPO, the reward model): the seeded epoch
    order, this rank's micro-batches of pairs, pairs as the loss unit, resumable state."""

    stage = "pairs"

    def __init__(self, recipe: Recipe, pairs: list[Pair], pad_id: int) -> None:
        self.recipe, self.pairs, self.pad_id = recipe, pairs, pad_id
        self.order = EpochOrder(len(pairs), recipe.seed)
        self.mean_length = sum(len(p.chosen[0]) + len(p.rejected[0]) for p in pairs) / len(pairs)

    def prepare_step(self, model: torch.nn.Module, step: int) -> None:
        pass

    def batches(self, step: int, env: DistEnv) -> list[list[Pair]]:
        return pair_batches(self.pairs, self.order, self.recipe, env)

    def count(self, micro: list[Pair]) -> float:
        return float(len(micro))

    def describe(self, step: int) -> dict[str, Any]:
        return {"stage": self.stage, "epoch": self.order.progress}

    def flops_per_unit(self, model: torch.nn.Module) -> float:
        return flops_per_token(model.config, int(self.mean_length)) * self.mean_length

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)


class DPOTask(PairTask):
    stage = "dpo"

    def __init__(self, recipe: Recipe, pairs: list[Pair], pad_id: int, reference: Any) -> None:
        super().__init__(recipe, pairs, pad_id)
        self.reference = reference  # (chosen, rejected) tensors indexed by pair, or a callable

    def reference_logps(self, micro: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
        return reference_logps(self.reference, micro)

    def loss(self, model: torch.nn.Module, micro: list[Pair]) -> tuple[torch.Tensor, dict[str, float]]:
        d = self.recipe.dpo
        chosen, rejected = pair_logps(model, micro, self.pad_id)
        ref_chosen, ref_rejected = self.reference_logps(micro)
        losses, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=d.beta,
                                   label_smoothing=d.label_smoothing, loss_type=d.loss_type)
        n = len(micro)
        return losses.sum(), {k: float(v) * n for k, v in metrics.items()}

    def should_evaluate(self, step: int) -> bool:
        return False

    def evaluate(self, model: Qwen2ForCausalLM, step: int) -> dict[str, float]:
        return {}


@torch.no_grad()
def preference_accuracy(model: torch.nn.Module, pairs: list[Pair], pad_id: int, reference: Any,
                        batch: int = 8) -> float:
    """Share of pairs whose implicit reward prefers the chosen reply: (pi - ref)(chosen) > (pi - ref)(rejected)."""
    model.eval()
    wins = 0
    for i in range(0, len(pairs), batch):
        part = pairs[i:i + batch]
        chosen, rejected = pair_logps(model, part, pad_id)
        ref_c, ref_r = reference_logps(reference, part)
        wins += int(((chosen - ref_c) > (rejected - ref_r)).sum())
    model.train()
    return wins / len(pairs)


def reference_policy(model: torch.nn.Module, pad_id: int, autocast: Any) -> Callable[[list[Pair]], tuple]:
    """The reference policy's log-probs of pairs: the model as it is now, kept as it is: with LoRA
    the same model with adapters switched off, otherwise a frozen copy."""
    from qwen2.train.lora import adapters_disabled, lora_layers

    if any(True for _ in lora_layers(model)):
        def logps(micro: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad(), adapters_disabled(model), autocast():
                return pair_logps(model, micro, pad_id)
        return logps
    frozen = copy.deepcopy(model).eval().requires_grad_(False)

    def frozen_logps(micro: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), autocast():
            return pair_logps(frozen, micro, pad_id)
    return frozen_logps


def pair_batches(pairs: list[Pair], order: EpochOrder, recipe: Recipe, env: DistEnv) -> list[list[Pair]]:
    """One step's pairs in epoch order, this rank's share, in micro-batches."""
    t = recipe.train
    chosen = [pairs[order.take()] for _ in range(t.micro_batch_size * t.grad_accum * env.world_size)]
    mine = chosen[env.rank::env.world_size]
    return [mine[i:i + t.micro_batch_size] for i in range(0, len(mine), t.micro_batch_size)]


def run_dpo(recipe: Recipe, out: str | Path, *, progress: bool = True, stop_after: int | None = None) -> dict:
    from qwen2.train.lora import lora_layers
    from qwen2.train.loop import autocast_for, make_optimizer, resume, start_run, train
    from qwen2.train.sft import finish, load_for_finetuning, pad_id

    if not recipe.data.preferences:
        raise RecipeError(f"{recipe.path}: [data] preferences = a JSONL file of {{prompt, chosen, rejected}}")
    out, env = start_run(recipe, out)
    pretrained, trainable = load_for_finetuning(recipe)
    tokenizer, model = pretrained.tokenizer, pretrained.model
    pad = pad_id(tokenizer)
    pairs = load_preferences(recipe.resolve(recipe.data.preferences, out), tokenizer, recipe.train.seq_len)
    autocast = autocast_for(recipe)
    uses_lora = any(True for _ in lora_layers(model))
    reference_model_logps = reference_policy(model, pad, autocast)

    if recipe.dpo.reference == "precomputed":
        # Before any step (and identically on resume: the reference is the init model, never trained).
        model.eval()
        chosen, rejected = zip(*(reference_model_logps(pairs[i:i + 8]) for i in range(0, len(pairs), 8)))
        model.train()
        reference: Any = (torch.cat(chosen), torch.cat(rejected))
        if not uses_lora:
            del reference_model_logps  # the frozen copy goes with it
    else:
        reference = reference_model_logps
    if env.is_main:
        print(f"DPO: {len(pairs)} pairs, reference {recipe.dpo.reference}, {trainable / 1e6:.2f}M trainable "
              f"parameters", file=sys.stderr, flush=True)
    optimizer = make_optimizer(model, recipe)
    task = DPOTask(recipe, pairs, pad, reference)
    step, units = resume(out, model, optimizer, task)
    with autocast():
        before = preference_accuracy(model, pairs, pad, reference) if step == 0 else None
    result = train(task, model, optimizer, recipe, out, env, start_step=step, units=units, progress=progress,
                   stop_after=stop_after, unit_name="pairs")
    with autocast():
        after = preference_accuracy(model, pairs, pad, reference)
    exported = finish(pretrained, recipe, out, result.steps, env)
    return {"steps": result.steps, "seconds": result.seconds, "accuracy_before": before, "accuracy_after": after,
            "model": exported, "trainable": trainable}
