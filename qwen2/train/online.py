"""Online preference training (the Qwen2 report's online RLHF stage): each iteration samples k
replies per prompt from the current policy, scores them (a verifier or a reward model), takes the
best and the worst of each prompt as a pair, and trains DPO on the pairs; then again, with the
updated policy. Optionally through the Online Merging Optimizer (qwen2.train.omo).

Generation and training share one process and one set of weights: the batching engine is built
on the very model being trained, a fresh engine per iteration (its cached prefixes would be stale
after an update). The DPO reference is the initial policy (a frozen copy, or with LoRA the base
with adapters off), its log-probs computed when the pairs are made.

Iteration i samples prompts [i*P, (i+1)*P) of the prompt file (cycling) with seeds derived from
(seed, i), and checkpoints fall between iterations, so a resumed run samples exactly what the
uninterrupted one did. metrics.jsonl has, per step, the iteration's mean sample reward and pair
count; at each evaluation the held-out SFT loss ([data] val: the alignment tax) and the mean
reward of greedy replies to held-out prompts ([online] eval_prompts).
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import torch

from qwen2.data.readers import DataError
from qwen2.inference.batch import sample_chats
from qwen2.inference.sampling import SamplingParams
from qwen2.train.data import EpochOrder
from qwen2.train.distributed import DistEnv
from qwen2.train.dpo import Pair, encode_reply, pair_batches, pair_logps, reference_policy
from qwen2.train.loop import flops_per_token
from qwen2.train.losses import dpo_loss
from qwen2.train.recipe import Recipe, RecipeError
from qwen2.train.sft import check_messages, read_jsonl

Reward = Callable[[list[dict], str, str], float]  # (prompt record, reply, finish reason) -> reward


def load_prompts(path: Path, *, need_answer: bool, tokenizer=None, max_len: int | None = None) -> list[dict]:
    """Prompt records {"messages": [...], "answer"?: ...} (the messages end with a user turn).
    With a tokenizer and max_len, a prompt that leaves no room for a reply is an error here,
    not hours later when an iteration first samples it."""
    from qwen2.tokenizer import encode_chat

    records = []
    for where, obj in read_jsonl(path):
        messages = check_messages(obj.get("messages"), where)
        if messages[-1]["role"] != "user":
            raise DataError(f"{where}: a prompt's messages must end with a user turn")
        if tokenizer is not None and max_len is not None:
            length = len(encode_chat(tokenizer, messages, add_generation_prompt=True))
            if length >= max_len - 1:
                raise DataError(f"{where}: the prompt has {length} tokens, leaving no room for a reply within "
                                f"[train] seq_len = {max_len}")
        if need_answer:
            try:
                Fraction(str(obj.get("answer")))
            except (ValueError, ZeroDivisionError):
                raise DataError(f"{where}: reward = \"maths\" needs an exact numeric \"answer\" "
                                f"(got {obj.get('answer')!r})") from None
        records.append({"messages": messages, "answer": obj.get("answer"), "where": where})
    if not records:
        raise DataError(f"{path}: no prompts")
    return records


def maths_reward() -> Callable[[list[dict], list[str], list[str]], list[float]]:
    from qwen2.eval.maths import reward

    def score(records: list[dict], replies: list[str], finish: list[str]) -> list[float]:
        return [reward(text, Fraction(str(r["answer"])), f) for r, text, f in zip(records, replies, finish)]
    return score


def model_reward(path: Path, tokenizer, dtype: torch.dtype) -> Callable[[list[dict], list[str], list[str]], list[float]]:
    """Rewards from a reward model directory, over the same chat rendering as training."""
    from qwen2.checkpoint import load_pretrained
    from qwen2.model.reward import Qwen2RewardModel
    from qwen2.tokenizer import encode_chat
    from qwen2.train.reward import pad_rows
    from qwen2.train.sft import pad_id

    model = load_pretrained(path, dtype=dtype).model
    if not isinstance(model, Qwen2RewardModel):
        raise RecipeError(f"{path}: not a reward model (config.json architectures must be Qwen2ForSequenceClassification)")
    model.eval()
    pad = pad_id(tokenizer)

    @torch.no_grad()
    def score(records: list[dict], replies: list[str], finish: list[str]) -> list[float]:
        rows = [encode_chat(tokenizer, r["messages"] + [{"role": "assistant", "content": text}], add_generation_prompt=False)
                for r, text in zip(records, replies)]
        out = []
        for i in range(0, len(rows), 8):
            ids, mask = pad_rows(rows[i:i + 8], pad)
            out += model(ids, attention_mask_BS=mask).tolist()
        return out
    return score


class OnlineDPOTask:
    def __init__(self, recipe: Recipe, pretrained, prompts: list[dict], score, reference: Callable, pad_id: int,
                 val_rows: list, eval_prompts: list[dict], autocast: Any, progress: bool) -> None:
        self.recipe, self.pretrained, self.prompts, self.score = recipe, pretrained, prompts, score
        self.reference, self.pad_id, self.val_rows, self.eval_prompts = reference, pad_id, val_rows, eval_prompts
        self.autocast, self.progress = autocast, progress
        self.iteration = -1
        self.pairs: list[Pair] = []
        self.ref: tuple[torch.Tensor, torch.Tensor] | None = None
        self.stats: dict[str, float] = {}
        self.order = EpochOrder(1, recipe.seed)

    # ---- sampling ------------------------------------------------------------------------------

    def _params(self, greedy: bool = False) -> SamplingParams:
        o = self.recipe.online
        if greedy:
            return SamplingParams(max_new_tokens=o.max_new_tokens)
        return SamplingParams(temperature=o.temperature, top_p=o.top_p, max_new_tokens=o.max_new_tokens)

    def _sample(self, model: torch.nn.Module, records: list[dict], k: int, params: SamplingParams, seed: int):
        model.eval()
        try:
            with torch.no_grad():
                policy = dataclasses.replace(self.pretrained, model=model)
                return sample_chats(policy, [r["messages"] for r in records], k=k, params=params, seed=seed,
                                    progress=False)
        finally:
            model.train()

    def _iteration_seed(self, iteration: int) -> int:
        return int.from_bytes(hashlib.sha256(f"{self.recipe.seed}/online/{iteration}".encode()).digest()[:4], "little")

    def _make_pairs(self, model: torch.nn.Module, iteration: int) -> None:
        o = self.recipe.online
        P = o.prompts_per_iteration
        records = [self.prompts[(iteration * P + i) % len(self.prompts)] for i in range(P)]
        samples = self._sample(model, records, o.k, self._params(), self._iteration_seed(iteration))
        tokenizer = self.pretrained.tokenizer
        pairs, rewards_all = [], []
        for index, (record, drawn) in enumerate(zip(records, samples)):
            rewards = self.score([record] * len(drawn), [s.text for s in drawn], [s.finish_reason for s in drawn])
            rewards_all += rewards
            best = max(range(len(drawn)), key=lambda j: rewards[j])
            worst = min(range(len(drawn)), key=lambda j: rewards[j])
            if rewards[best] <= rewards[worst]:
                continue  # all alike: nothing to prefer
            sides = [encode_reply(tokenizer, record["messages"], [{"role": "assistant", "content": drawn[j].text}],
                                  record["where"], self.recipe.train.seq_len) for j in (best, worst)]
            pairs.append(Pair(len(pairs), sides[0], sides[1]))
        self.pairs = pairs
        if pairs:  # 8 pairs per forward, as offline DPO: the logits of a whole iteration would not fit
            parts = [self.reference(pairs[i:i + 8]) for i in range(0, len(pairs), 8)]
            self.ref = (torch.cat([c for c, _ in parts]), torch.cat([r for _, r in parts]))
        else:
            self.ref = None
        self.order = EpochOrder(max(len(pairs), 1), self._iteration_seed(iteration))
        self.stats = {"iteration": iteration, "sample_reward": sum(rewards_all) / len(rewards_all),
                      "pairs": len(pairs)}
        if self.progress:
            print(f"iteration {iteration}: mean sample reward {self.stats['sample_reward']:.3f}, {len(pairs)} pairs "
                  f"from {P} prompts", file=sys.stderr, flush=True)

    # ---- the loop's Task protocol --------------------------------------------------------------

    def prepare_step(self, model: torch.nn.Module, step: int) -> None:
        iteration = step // self.recipe.online.steps_per_iteration
        if iteration != self.iteration:
            self._make_pairs(model, iteration)
            self.iteration = iteration

    def batches(self, step: int, env: DistEnv) -> list[list[Pair]]:
        return pair_batches(self.pairs, self.order, self.recipe, env) if self.pairs else []

    def count(self, micro: list[Pair]) -> float:
        return float(len(micro))

    def loss(self, model: torch.nn.Module, micro: list[Pair]) -> tuple[torch.Tensor, dict[str, float]]:
        d = self.recipe.dpo
        chosen, rejected = pair_logps(model, micro, self.pad_id)
        index = torch.tensor([p.index for p in micro])
        losses, metrics = dpo_loss(chosen, rejected, self.ref[0][index], self.ref[1][index], beta=d.beta,
                                   label_smoothing=d.label_smoothing, loss_type=d.loss_type)
        n = len(micro)
        return losses.sum(), {k: float(v) * n for k, v in metrics.items()}

    def should_evaluate(self, step: int) -> bool:
        return bool(self.val_rows or self.eval_prompts) and step % self.recipe.train.eval_every == 0

    def evaluate(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        return evaluate_policy(model, self)

    def describe(self, step: int) -> dict[str, Any]:
        return {"stage": "online", **self.stats}

    def flops_per_unit(self, model: torch.nn.Module) -> float:
        return flops_per_token(model.config, self.recipe.train.seq_len) * self.recipe.train.seq_len

    def state_dict(self) -> dict:
        return {}  # checkpoints fall between iterations: the next one is sampled again from the policy

    def load_state_dict(self, state: dict) -> None:
        pass


@torch.no_grad()
def evaluate_policy(model: torch.nn.Module, task: OnlineDPOTask) -> dict[str, float]:
    """Held-out SFT loss per assistant token (the alignment tax) and the mean reward of greedy
    replies to the held-out prompts."""
    from qwen2.train.sft import SFTTask

    result = {}
    if task.val_rows:  # SFT's own validation loss, on the held-out conversations
        result["sft_val_loss"] = SFTTask(task.recipe, None, task.val_rows, task.autocast).evaluate(model, 0)["val_loss"]
    if task.eval_prompts:
        replies = task._sample(model, task.eval_prompts, 1, task._params(greedy=True), 0)
        rewards = task.score(task.eval_prompts, [r[0].text for r in replies], [r[0].finish_reason for r in replies])
        result["eval_reward"] = sum(rewards) / len(rewards)
    return result


def run_online(recipe: Recipe, out: str | Path, *, progress: bool = True, stop_after: int | None = None) -> dict:
    from qwen2.train.loop import autocast_for, resume, start_run, train
    from qwen2.train.sft import finish, load_for_finetuning, pad_id, validation_rows

    if not recipe.data.prompts:
        raise RecipeError(f"{recipe.path}: [data] prompts = a JSONL file of {{\"messages\": [...], \"answer\"?: ...}}")
    o = recipe.online
    out, env = start_run(recipe, out)
    if env.enabled:
        raise RecipeError("online training runs in one process (generation and training share the weights)")
    pretrained, trainable = load_for_finetuning(recipe)
    tokenizer, model = pretrained.tokenizer, pretrained.model
    pad = pad_id(tokenizer)
    seq_len = recipe.train.seq_len
    prompts = load_prompts(recipe.resolve(recipe.data.prompts, out), need_answer=o.reward == "maths",
                           tokenizer=tokenizer, max_len=seq_len)
    eval_prompts = load_prompts(recipe.resolve(o.eval_prompts, out), need_answer=o.reward == "maths",
                                tokenizer=tokenizer, max_len=seq_len) if o.eval_prompts else []
    score = maths_reward() if o.reward == "maths" else model_reward(recipe.resolve(o.reward_model, out), tokenizer,
                                                                    torch.float32)
    val_rows = validation_rows(recipe, out, tokenizer)
    autocast = autocast_for(recipe)
    reference = reference_policy(model, pad, autocast)
    optimizer = make_online_optimizer(model, recipe, out)
    if env.is_main:
        merge = "AdamW" if o.merge == "none" else f"online merging ({o.merge}, reserve_p {o.reserve_p}, alpha {o.alpha})"
        print(f"online DPO: {len(prompts)} prompts, {o.prompts_per_iteration} x {o.k} samples per iteration, "
              f"{recipe.total_steps // o.steps_per_iteration} iterations, reward {o.reward}, {merge}, "
              f"{trainable / 1e6:.2f}M trainable parameters", file=sys.stderr, flush=True)
    task = OnlineDPOTask(recipe, pretrained, prompts, score, reference, pad, val_rows, eval_prompts, autocast, progress)
    step, units = resume(out, model, optimizer, task)
    before = evaluate_policy(model, task) if step == 0 else None
    result = train(task, model, optimizer, recipe, out, env, start_step=step, units=units, progress=progress,
                   stop_after=stop_after, unit_name="pairs")
    after = evaluate_policy(model, task)
    exported = finish(pretrained, recipe, out, result.steps, env)
    return {"steps": result.steps, "seconds": result.seconds, "before": before, "after": after, "model": exported,
            "trainable": trainable}


def make_online_optimizer(model: torch.nn.Module, recipe: Recipe, out: Path) -> torch.optim.Optimizer:
    """AdamW, or the Online Merging Optimizer with tau_ref = init - base over the trainable parameters."""
    from qwen2.train.loop import make_optimizer

    o, t = recipe.online, recipe.train
    if o.merge == "none":
        return make_optimizer(model, recipe)
    from qwen2.checkpoint import load_pretrained
    from qwen2.train.omo import OnlineMergingAdamW, reference_task_vector

    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if any(".lora_" in n for n in named):
        raise RecipeError(f"{recipe.path}: [online] merge works on the model's own weights; drop [lora] to use it")
    base = load_pretrained(recipe.resolve(o.base, out), dtype=torch.float32).model
    delta = reference_task_vector(named, base)
    del base
    decay = [p for p in named.values() if p.dim() >= 2]
    no_decay = [p for p in named.values() if p.dim() < 2]
    return OnlineMergingAdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                              delta, mode=o.merge, reserve_p=o.reserve_p, alpha=o.alpha, rescale=o.rescale,
                              lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, seed=recipe.seed)
