"""Pre-training from a recipe, in stages (general -> high quality -> long context), on the one loop.

`run(recipe, out)` prepares what the recipe asks for (download a built-in corpus, learn the
tokenizer on its training side, pack one shard set per domain), builds the model from a preset plus
overrides, and trains a PretrainTask on qwen2.train.loop: each stage has its mixture weights
(moving linearly to `mixture_end` if given: dynamic data sampling), its sequence length and batch
rows, and the long-context stage raises the RoPE base and context length, which the saved
config.json records. Every process draws the same global batch and keeps its rows, so 1 or N
processes (DDP or FSDP2) train alike.

Outputs in `out`: metrics.jsonl, checkpoints/ (qwen2.train.checkpointing), loss.png /
training.png, model/ (the final Hugging Face directory with the tokenizer), and data/ + tokenizer/
when prepared here. The summary compares the validation loss with a unigram baseline.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qwen2.config import PRESETS, Qwen2Config
from qwen2.data.shards import TokenShard, find_shards
from qwen2.model import Qwen2ForCausalLM
from qwen2.tokenizer import Tokenizer
from qwen2.train.data import Batch, MixtureLoader, epochs_seen, validation_batches
from qwen2.train.distributed import DistEnv, barrier, init_distributed
from qwen2.train.loop import (autocast_for, flops_per_token, full_state_dict, make_optimizer, mean_loss, resume,
                              shard_model, train)
from qwen2.train.recipe import Recipe, StageSpec


@dataclass
class Summary:
    steps: int
    val_loss: float | None
    unigram_loss: float | None
    tokens: int
    seconds: float
    out: Path


# ----------------------------------------------------------------------------------------------------
# Preparation: corpus -> tokenizer -> shards (rank 0; the others wait)


def prepare(recipe: Recipe, out: Path, env: DistEnv) -> tuple[Tokenizer, dict[str, list[Path]], list[Path]]:
    data_dir = out / "data"
    if env.is_main:
        _prepare_main(recipe, out, data_dir)
    barrier(env)
    tokenizer = Tokenizer.from_dir(_tokenizer_dir(recipe, out))
    if recipe.data.sources:
        sources = {name: find_shards(recipe.resolve(path, out)) for name, path in recipe.data.sources.items()}
    else:
        sources = {"corpus": find_shards(data_dir / "train")}
    val_path = recipe.resolve(recipe.data.val, out) if recipe.data.val else data_dir / "val"
    val = find_shards(val_path) if recipe.data.val or (data_dir / "val").is_dir() else []
    return tokenizer, sources, val


def _tokenizer_dir(recipe: Recipe, out: Path) -> Path:
    return recipe.resolve(recipe.tokenizer.path, out) if recipe.tokenizer.path else out / "tokenizer"


def _prepare_main(recipe: Recipe, out: Path, data_dir: Path) -> None:
    from qwen2.data.corpora import corpus_documents
    from qwen2.data.shards import pack_documents
    from qwen2.tokenizer.trainer import TrainerConfig, train_tokenizer

    tokenizer_dir = _tokenizer_dir(recipe, out)
    documents = None
    if recipe.data.corpus and not (data_dir / "train").is_dir():
        from qwen2.demo import cache_dir

        documents = corpus_documents(recipe.data.corpus, cache_dir() / "corpora")
    if not (tokenizer_dir / "tokenizer.json").is_file():
        if not recipe.tokenizer.train_vocab_size:
            raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer.json (and the recipe trains none)")
        if documents is None:
            raise ValueError("learning a tokenizer needs the recipe's corpus (data.corpus)")
        print(f"learning a {recipe.tokenizer.train_vocab_size}-token BBPE vocabulary from {len(documents)} documents",
              flush=True)
        # Learned on the training split only: the validation text stays unseen by every stage.
        from qwen2.data.shards import split_of

        train_texts = [d.text for d in documents if split_of(d, recipe.data.val_fraction) == "train"]
        train_tokenizer(train_texts, TrainerConfig(vocab_size=recipe.tokenizer.train_vocab_size,
                                                   show_progress=False)).save(tokenizer_dir)
    if documents is not None:
        tokenizer = Tokenizer.from_dir(tokenizer_dir)
        # one shard set per domain (<domain>-00000.bin ...), so recipes can mix domains by stage
        for domain in sorted({d.domain or recipe.data.corpus for d in documents}):
            written = pack_documents([d for d in documents if (d.domain or recipe.data.corpus) == domain], tokenizer,
                                     data_dir, name=domain, val_fraction=recipe.data.val_fraction)
            print(f"packed {domain}: " + ", ".join(
                f"{split} {sum(TokenShard.open(p).num_tokens for p in paths):,} tokens"
                for split, paths in written.items()), flush=True)


# ----------------------------------------------------------------------------------------------------
# Model and optimizer


def model_config(recipe: Recipe, tokenizer: Tokenizer) -> Qwen2Config:
    if recipe.model.preset not in PRESETS:
        raise ValueError(f"[model] preset {recipe.model.preset!r} is not one of {sorted(PRESETS)}")
    fields = {"vocab_size": -(-tokenizer.vocab_size // 64) * 64,  # embedding rows padded as Qwen2 pads them
              "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None,
              "torch_dtype": "float32", **recipe.model.overrides}
    if fields["vocab_size"] < tokenizer.vocab_size:
        raise ValueError(f"[model] vocab_size {fields['vocab_size']} is smaller than the tokenizer's {tokenizer.vocab_size}")
    try:
        return dataclasses.replace(PRESETS[recipe.model.preset], **fields)
    except TypeError as e:
        raise ValueError(f"[model]: {e}") from None


def _mixture(stage: StageSpec, t: int, names: list[str]) -> dict[str, float]:
    start = stage.mixture or {n: 1.0 for n in names}
    if not stage.mixture_end:
        return start
    f = t / max(1, stage.steps - 1)
    return {n: (1 - f) * start.get(n, 0.0) + f * stage.mixture_end.get(n, 0.0) for n in names}


def _enter_stage(model: Qwen2ForCausalLM, stage: StageSpec) -> None:
    if stage.rope_theta is not None or stage.max_position_embeddings is not None:
        model.set_context(rope_theta=stage.rope_theta, max_position_embeddings=stage.max_position_embeddings)


def unigram_loss(train: list[TokenShard], val_batches: list[Batch], vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the validation tokens under the training set's unigram
    frequencies (add-one smoothed): the baseline a model must beat to have learned anything beyond counts."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for shard in train:
        counts += np.bincount(np.asarray(shard.tokens), minlength=vocab_size)[:vocab_size]
    logp = np.log(counts / counts.sum())
    labels = np.concatenate([b.labels_BT.numpy().ravel() for b in val_batches])
    return float(-logp[labels].mean())


class PretrainTask:
    """Packed windows from the mixture loader, stage by stage (qwen2.train.loop.Task)."""

    def __init__(self, recipe: Recipe, loader: MixtureLoader, val_shards: list[TokenShard], autocast: Any) -> None:
        self.recipe, self.loader, self.val_shards, self.autocast = recipe, loader, val_shards, autocast
        self.current: StageSpec | None = None
        self._val: dict[int, list[Batch]] = {}

    def seq_len(self, stage: StageSpec) -> int:
        return stage.seq_len or self.recipe.train.seq_len

    def prepare_step(self, model: Qwen2ForCausalLM, step: int) -> None:
        stage = self.recipe.stage_at(step)[0]
        if stage is not self.current:
            _enter_stage(model, stage)
            self.current = stage

    def batches(self, step: int, env: DistEnv) -> list[Batch]:
        t = self.recipe.train
        stage, into = self.recipe.stage_at(step)
        micro = stage.micro_batch_size or t.micro_batch_size
        batch = self.loader.next_batch(micro * t.grad_accum * env.world_size, self.seq_len(stage),
                                       _mixture(stage, into, self.loader.names), rank=env.rank,
                                       world_size=env.world_size)
        return [Batch(batch.input_ids_BT[i:i + micro], batch.labels_BT[i:i + micro],
                      batch.document_ids_BT[i:i + micro], batch.sources[i:i + micro])
                for i in range(0, len(batch.sources), micro)]

    def count(self, micro: Batch) -> float:
        return float(micro.num_tokens)  # every position has a label in pre-training

    def loss(self, model: torch.nn.Module, micro: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        return model(micro.input_ids_BT, document_ids_BT=micro.document_ids_BT, labels_BT=micro.labels_BT,
                     loss_chunk=self.recipe.train.loss_chunk), {}

    def val_batches(self, seq_len: int) -> list[Batch]:
        if seq_len not in self._val and self.val_shards:
            t = self.recipe.train
            self._val[seq_len] = validation_batches(self.val_shards, batch_size=t.micro_batch_size, seq_len=seq_len,
                                                    max_batches=t.eval_batches)
        return self._val.get(seq_len, [])

    def should_evaluate(self, step: int) -> bool:
        stage_ends = self.recipe.stage_at(step)[0] is not self.recipe.stage_at(step - 1)[0]
        return bool(self.val_shards) and (step % self.recipe.train.eval_every == 0 or stage_ends)

    def evaluate(self, model: Qwen2ForCausalLM, step: int) -> dict[str, float]:
        if not self.val_shards:
            return {}
        loss = mean_loss(self, model, self.val_batches(self.seq_len(self.recipe.stage_at(step - 1)[0])), self.autocast)
        return {"val_loss": loss, "val_ppl": math.exp(loss)}

    def describe(self, step: int) -> dict[str, Any]:
        stage = self.recipe.stage_at(step)[0]
        return {"stage": stage.name, "seq_len": self.seq_len(stage), "epochs": epochs_seen(self.loader)}

    def flops_per_unit(self, model: Qwen2ForCausalLM) -> float:
        return flops_per_token(model.config, self.seq_len(self.current or self.recipe.stages[0]))

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])


def run(recipe: Recipe, out: str | Path, *, progress: bool = True, stop_after: int | None = None) -> Summary:
    """Train (or resume) the recipe's run in `out`. `stop_after` ends early after that many steps
    in this call (tests: a run interrupted and resumed must continue identically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    env = init_distributed()
    t = recipe.train
    if t.threads:
        torch.set_num_threads(t.threads)
    tokenizer, source_paths, val_paths = prepare(recipe, out, env)
    fingerprint = tokenizer.fingerprint
    sources = {name: [TokenShard.open(p, fingerprint=fingerprint) for p in paths] for name, paths in source_paths.items()}
    val_shards = [TokenShard.open(p, fingerprint=fingerprint) for p in val_paths]

    torch.manual_seed(recipe.seed)
    model = Qwen2ForCausalLM(model_config(recipe, tokenizer))
    model.init_weights(seed=recipe.seed)
    model.model.gradient_checkpointing = t.activation_checkpointing
    if t.compile:
        for layer in model.model.layers:  # identical layers: one compilation serves them all
            layer.compile()
    shard_model(model, recipe, env)
    optimizer = make_optimizer(model, recipe)
    task = PretrainTask(recipe, MixtureLoader(sources, seed=recipe.seed), val_shards, autocast_for(recipe))

    def enter_stages_up_to(step: int) -> None:  # the checkpoint's RoPE base and context length
        for stage in recipe.stages[:recipe.stages.index(recipe.stage_at(step - 1)[0]) + 1]:
            _enter_stage(model, stage)

    step, tokens = resume(out, model, optimizer, task, before_load=enter_stages_up_to)
    if step and env.is_main:
        print(f"resuming {out} from step {step}", flush=True)
    result = train(task, model, optimizer, recipe, out, env, start_step=step, units=tokens, progress=progress,
                   stop_after=stop_after)
    baseline = None
    weights = full_state_dict(model) if result.steps >= recipe.total_steps else None  # every rank takes part
    if result.steps >= recipe.total_steps and env.is_main:
        from qwen2.checkpoint.loader import Pretrained, save_pretrained
        from qwen2.train.plots import plot_metrics

        plain = Qwen2ForCausalLM(model.config)  # unsharded, for the Hugging Face export
        missing, unexpected = plain.load_state_dict(weights, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise RuntimeError(f"export: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        plain.tie_weights()
        save_pretrained(Pretrained(plain, tokenizer, {}, str(out)), out / "model", dtype=torch.float32)
        plot_metrics(out / "metrics.jsonl", out)
        if val_shards:  # on the very batches of the last validation loss
            baseline = unigram_loss([s for shards in sources.values() for s in shards],
                                    task.val_batches(task.seq_len(recipe.stages[-1])), model.config.vocab_size)
    return Summary(result.steps, result.last_eval.get("val_loss"), baseline, int(result.units), result.seconds, out)
