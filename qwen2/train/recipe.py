"""Training recipes: one TOML file describes a whole run (model, tokenizer, data, optimizer, stages).

Every table is a dataclass; unknown keys and wrong types are errors naming the key, since a typo in
a recipe would otherwise silently train something else. Paths are relative to the recipe file;
"{out}" in a path is the run directory. See recipes/ for examples and docs/TRAINING.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen2.tomlspec import RecipeError, build as _build, read_toml
from qwen2.train.schedule import SCHEDULES

__all__ = ["RecipeError", "load_recipe"]


@dataclass(frozen=True)
class ModelSpec:
    preset: str | None = None  # a qwen2.config.PRESETS name to start from
    init: str | None = None  # or a model to continue from (directory, .gguf, hub id)
    overrides: dict[str, Any] = field(default_factory=dict)  # config.json fields (hidden_size, ...)


@dataclass(frozen=True)
class TokenizerSpec:
    path: str | None = None  # a tokenizer directory; or learn one from the corpus:
    train_vocab_size: int | None = None


@dataclass(frozen=True)
class DataSpec:
    sources: dict[str, str] = field(default_factory=dict)  # pretrain: name -> token-shard directory
    val: str | None = None  # validation: shards (pretrain) or a JSONL file (sft, dpo)
    corpus: str | None = None  # a built-in corpus to download and pack first ("shakespeare")
    val_fraction: float = 0.05  # for the built-in corpus
    conversations: str | None = None  # sft: JSONL {"messages": [...]}
    preferences: str | None = None  # dpo: JSONL {"prompt": [...], "chosen": [...], "rejected": [...]}
    prompts: str | None = None  # online: JSONL {"messages": [...], "answer"?: ...}


@dataclass(frozen=True)
class LoRASpec:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    merge: bool = True  # fold the adapters into the exported model


@dataclass(frozen=True)
class DPOSpec:
    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"  # or "ipo"
    reference: str = "precomputed"  # reference log-probs computed once before training, or "on_the_fly"


@dataclass(frozen=True)
class OnlineSpec:
    """Online preference training (qwen2.train.online): each iteration samples k replies per prompt
    from the current policy, scores them, and trains DPO on best vs worst."""
    reward: str = "maths"  # "maths": the prompt's "answer", checked exactly; "model": a reward model
    reward_model: str | None = None  # directory of a Qwen2ForSequenceClassification model (reward = "model")
    k: int = 4  # samples per prompt
    prompts_per_iteration: int = 8
    steps_per_iteration: int = 1  # optimizer steps on each iteration's pairs
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    merge: str = "none"  # "dare" / "ties": the Online Merging Optimizer instead of AdamW
    base: str | None = None  # the pre-trained model the init (SFT) model came from: tau_ref = init - base
    reserve_p: float = 0.1
    alpha: float = 0.01
    rescale: bool = False
    eval_prompts: str | None = None  # held-out prompts: mean reward of greedy replies at each evaluation


@dataclass(frozen=True)
class TrainSpec:
    seq_len: int = 256
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: str = "cosine"
    decay_fraction: float = 0.2  # wsd only
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: str = "bfloat16"  # autocast dtype ("float32": no autocast)
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder layer (inductor fuses the elementwise ops)
    parallel: str = "ddp"  # under torchrun: "ddp" (replicated) or "fsdp" (FSDP2: parameters, grads, optimizer sharded)
    loss_chunk: int | None = None  # rows of logits at a time in the cross-entropy (None: ~256 MB of them)
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100
    keep_last: int = 2
    log_every: int = 10
    threads: int | None = None


@dataclass(frozen=True)
class StageSpec:
    name: str
    steps: int
    mixture: dict[str, float] = field(default_factory=dict)  # default: every source alike
    mixture_end: dict[str, float] | None = None  # if given, weights move linearly to these over the stage
    seq_len: int | None = None  # default: train.seq_len
    micro_batch_size: int | None = None  # default: train.micro_batch_size (longer sequences: fewer rows)
    rope_theta: float | None = None  # the long-context stage raises these
    max_position_embeddings: int | None = None


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    seed: int
    model: ModelSpec
    tokenizer: TokenizerSpec
    data: DataSpec
    train: TrainSpec
    stages: tuple[StageSpec, ...]
    lora: LoRASpec | None = None
    dpo: DPOSpec = field(default_factory=DPOSpec)
    online: OnlineSpec = field(default_factory=OnlineSpec)

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def resolve(self, value: str, out: Path) -> Path:
        path = Path(value.replace("{out}", str(out)))
        return path if path.is_absolute() else self.path.parent / path

    def stage_at(self, step: int) -> tuple[StageSpec, int]:
        """The stage optimizer step `step` belongs to, and how far into it (0-based)."""
        start = 0
        for stage in self.stages:
            if step < start + stage.steps:
                return stage, step - start
            start += stage.steps
        return self.stages[-1], self.stages[-1].steps - 1


def _mixture_files(stage: Any, path: Path) -> Any:
    """A stage's `mixture` / `mixture_end` may name a mixture.json (qwen2 data mixture-search)."""
    if not isinstance(stage, dict):
        return stage
    from qwen2.data.mixture import load_mixture_file

    return {k: load_mixture_file(path.parent / v) if k in ("mixture", "mixture_end") and isinstance(v, str) else v
            for k, v in stage.items()}


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    raw = read_toml(path)
    where = str(path)
    known = {"name", "seed", "model", "tokenizer", "data", "train", "stage", "lora", "dpo", "online"}
    if unknown := sorted(set(raw) - known):
        raise RecipeError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    model_raw = dict(raw.get("model", {}))
    model = ModelSpec(preset=model_raw.pop("preset", None), init=model_raw.pop("init", None), overrides=model_raw)
    stages_raw = raw.get("stage", [])
    if not isinstance(stages_raw, list) or not stages_raw:
        raise RecipeError(f"{where}: at least one [[stage]] with a name and steps is needed")
    stages = tuple(_build(StageSpec, _mixture_files(s, path), f"{where}: stage {i + 1}")
                   for i, s in enumerate(stages_raw))
    train = _build(TrainSpec, raw.get("train", {}), f"{where}: [train]")
    data = _build(DataSpec, raw.get("data", {}), f"{where}: [data]")
    recipe = Recipe(name=str(raw.get("name", path.stem)), path=path.resolve(), seed=int(raw.get("seed", 0)),
                    model=model, tokenizer=_build(TokenizerSpec, raw.get("tokenizer", {}), f"{where}: [tokenizer]"),
                    data=data, train=train, stages=stages,
                    lora=_build(LoRASpec, raw["lora"], f"{where}: [lora]") if "lora" in raw else None,
                    dpo=_build(DPOSpec, raw.get("dpo", {}), f"{where}: [dpo]"),
                    online=_build(OnlineSpec, raw.get("online", {}), f"{where}: [online]"))
    _check(recipe, where)
    return recipe


def _check(recipe: Recipe, where: str) -> None:
    t = recipe.train
    for key in ("seq_len", "micro_batch_size", "grad_accum", "eval_every", "save_every", "log_every"):
        if getattr(t, key) < 1:
            raise RecipeError(f"{where}: [train] {key} must be at least 1 (got {getattr(t, key)})")
    if t.schedule not in SCHEDULES:
        raise RecipeError(f"{where}: [train] schedule must be one of {SCHEDULES} (got {t.schedule!r})")
    if t.parallel not in ("ddp", "fsdp"):
        raise RecipeError(f"{where}: [train] parallel must be ddp or fsdp (got {t.parallel!r})")
    if t.dtype not in ("bfloat16", "float32"):
        raise RecipeError(f"{where}: [train] dtype must be bfloat16 or float32 (got {t.dtype!r})")
    if not (recipe.model.preset or recipe.model.init):
        raise RecipeError(f"{where}: [model] needs a preset (plus overrides) or init = a model to continue from")
    if not (recipe.tokenizer.path or recipe.tokenizer.train_vocab_size or recipe.model.init):
        raise RecipeError(f"{where}: [tokenizer] needs path = a tokenizer directory, or train_vocab_size")
    if not (recipe.data.sources or recipe.data.corpus or recipe.data.conversations or recipe.data.preferences
            or recipe.data.prompts):
        raise RecipeError(f"{where}: [data] needs sources = {{name = shard directory}}, a corpus, "
                          f"conversations (sft), preferences (dpo, reward) or prompts (online)")
    o = recipe.online
    if o.reward not in ("maths", "model") or (o.reward == "model" and not o.reward_model):
        raise RecipeError(f"{where}: [online] reward must be maths, or model with reward_model = a directory")
    if o.k < 2 or o.prompts_per_iteration < 1 or o.steps_per_iteration < 1 or o.max_new_tokens < 1:
        raise RecipeError(f"{where}: [online] needs k >= 2 and prompts_per_iteration, steps_per_iteration, "
                          f"max_new_tokens >= 1")
    if o.merge not in ("none", "dare", "ties") or (o.merge != "none" and not o.base):
        raise RecipeError(f"{where}: [online] merge must be none, dare or ties; dare / ties need base = the "
                          f"pre-trained model the init model was fine-tuned from")
    if recipe.data.prompts and t.save_every % o.steps_per_iteration:
        raise RecipeError(f"{where}: [train] save_every must be a multiple of [online] steps_per_iteration "
                          f"(checkpoints fall between iterations, so a resumed run samples what it would have)")
    if recipe.dpo.loss_type not in ("sigmoid", "ipo") or recipe.dpo.reference not in ("precomputed", "on_the_fly"):
        raise RecipeError(f"{where}: [dpo] loss_type must be sigmoid|ipo and reference precomputed|on_the_fly")
    for i, stage in enumerate(recipe.stages, 1):
        if stage.steps < 1:
            raise RecipeError(f"{where}: stage {i} ({stage.name}) needs steps >= 1")
        names = set(stage.mixture) | set(stage.mixture_end or {})
        known = set(recipe.data.sources) or {"corpus"}
        if names - known:
            raise RecipeError(f"{where}: stage {i} ({stage.name}) mixes unknown sources {sorted(names - known)}; "
                              f"the sources are {sorted(known)}")
