"""Pre-training from a recipe: the one training loop, in stages (general -> high quality -> long context).

`run(recipe, out)` prepares what the recipe asks for (download and pack a built-in corpus, learn
the tokenizer), builds the model, and trains stage by stage: the mixture weights of the stage
(moving linearly to `mixture_end` if given: dynamic data sampling), its sequence length, and for
the long-context stage a raised RoPE base and context length that the saved config.json records.

A step: the global batch (micro_batch_size x grad_accum x processes sequences) is drawn by every
process alike and each takes its rows; each micro-batch's summed cross-entropy is scaled by
processes / (loss tokens in the global batch), so after DDP's averaging the gradient is that of
the global mean, whatever the process count. bf16 autocast with float32 master weights; AdamW
(no decay on norms and biases); gradient clipping; lr from the step alone (qwen2.train.schedule).

Outputs in `out`: metrics.jsonl (one record per log step and per evaluation), checkpoints/
(resumable, qwen2.train.checkpointing), plots (loss.png, lr.png) and model/ (the final Hugging
Face directory with the tokenizer).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qwen2.config import PRESETS, Qwen2Config
from qwen2.data.shards import TokenShard, find_shards
from qwen2.model import Qwen2ForCausalLM
from qwen2.tokenizer import Tokenizer
from qwen2.train.checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from qwen2.train.data import Batch, MixtureLoader, epochs_seen, validation_batches
from qwen2.train.distributed import DistEnv, all_reduce_sum, barrier, init_distributed
from qwen2.train.recipe import Recipe, StageSpec
from qwen2.train.schedule import learning_rate


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
        written = pack_documents(documents, tokenizer, data_dir, name=recipe.data.corpus,
                                 val_fraction=recipe.data.val_fraction)
        print("packed " + ", ".join(f"{split}: {sum(TokenShard.open(p).num_tokens for p in paths):,} tokens"
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


def make_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.AdamW:
    t = recipe.train
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)  # norms and biases are not decayed
    return torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)


def flops_per_token(config: Qwen2Config, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (non-embedding parameters + LM head) + attention (PaLM's 12 L H Q T / 2
    for a causal mask is not subtracted: the usual convention)."""
    D, L, F = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = config.num_key_value_heads * config.dim_per_head
    per_layer = D * D + 2 * D * kv + D * D + 3 * D * F
    return 6 * (L * per_layer + D * config.vocab_size) + 12 * L * D * seq_len


def measured_peak_flops(dtype: torch.dtype, seconds: float = 0.5) -> float:
    """This machine's matmul throughput (the denominator of MFU): a square GEMM timed for ~`seconds`."""
    a = torch.randn(1024, 1024, dtype=dtype)
    b = torch.randn(1024, 1024, dtype=dtype)
    a @ b
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        n += 1
    return 2 * 1024 ** 3 * n / (time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------------
# The loop


def _mixture(stage: StageSpec, t: int, names: list[str]) -> dict[str, float]:
    start = stage.mixture or {n: 1.0 for n in names}
    if not stage.mixture_end:
        return start
    f = t / max(1, stage.steps - 1)
    return {n: (1 - f) * start.get(n, 0.0) + f * stage.mixture_end.get(n, 0.0) for n in names}


def _enter_stage(model: Qwen2ForCausalLM, stage: StageSpec) -> None:
    if stage.rope_theta is not None or stage.max_position_embeddings is not None:
        model.set_context(rope_theta=stage.rope_theta, max_position_embeddings=stage.max_position_embeddings)


@torch.no_grad()
def evaluate(model: Qwen2ForCausalLM, batches: list[Batch], autocast: Any, chunk: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        with autocast():
            total += float(model(batch.input_ids_BT, document_ids_BT=batch.document_ids_BT,
                                 labels_BT=batch.labels_BT, loss_chunk=chunk))
        count += batch.num_tokens
    model.train()
    return total / max(1, count)


def unigram_loss(train: list[TokenShard], val_batches: list[Batch], vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the validation tokens under the training set's unigram
    frequencies (add-one smoothed): the baseline a model must beat to have learned anything beyond counts."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for shard in train:
        counts += np.bincount(np.asarray(shard.tokens), minlength=vocab_size)[:vocab_size]
    logp = np.log(counts / counts.sum())
    labels = np.concatenate([b.labels_BT.numpy().ravel() for b in val_batches])
    return float(-logp[labels].mean())


class MetricsLog:
    """metrics.jsonl, append-only; on resume the records after the checkpoint's step are dropped,
    so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def run(recipe: Recipe, out: str | Path, *, progress: bool = True, stop_after: int | None = None) -> Summary:
    """Train (or resume) the recipe's run in `out`. `stop_after` ends early after that many steps
    in this call (tests: a run interrupted and resumed must continue identically)."""
    from tqdm import tqdm

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
    config = model_config(recipe, tokenizer)
    model = Qwen2ForCausalLM(config)
    model.init_weights(seed=recipe.seed)
    model.model.gradient_checkpointing = t.activation_checkpointing
    if t.compile:
        for layer in model.model.layers:  # identical layers: one compilation serves them all
            layer.compile()
    optimizer = make_optimizer(model, recipe)
    loader = MixtureLoader(sources, seed=recipe.seed)

    step, tokens_seen = 0, 0
    latest = latest_checkpoint(out)
    if latest is not None:
        state = json.loads((latest / "trainer_state.json").read_text(encoding="utf-8"))
        for stage in recipe.stages[:recipe.stages.index(recipe.stage_at(state["step"] - 1)[0]) + 1]:
            _enter_stage(model, stage)  # the checkpoint's RoPE base and context
        state = load_checkpoint(latest, model, optimizer)
        loader.load_state_dict(state["loader"])
        step, tokens_seen = state["step"], state["tokens"]
        if env.is_main:
            print(f"resuming {out} from step {step} ({latest.name})", flush=True)
    elif recipe.stages:
        _enter_stage(model, recipe.stages[0])

    train_model: torch.nn.Module = model
    if env.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(model)
    dtype = torch.bfloat16 if t.dtype == "bfloat16" else torch.float32
    autocast = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext
    metrics = MetricsLog(out / "metrics.jsonl", step, env.is_main)
    peak = measured_peak_flops(dtype) if env.is_main else 1.0
    val_batches_by_len: dict[int, list[Batch]] = {}

    def val_batches(seq_len: int) -> list[Batch]:
        if seq_len not in val_batches_by_len and val_shards:
            val_batches_by_len[seq_len] = validation_batches(val_shards, batch_size=t.micro_batch_size,
                                                             seq_len=seq_len, max_batches=t.eval_batches)
        return val_batches_by_len.get(seq_len, [])

    total = recipe.total_steps
    bar = tqdm(total=total, initial=step, desc=recipe.name, disable=not (progress and env.is_main), unit="step")
    started, window_tokens, window_start = time.perf_counter(), 0, time.perf_counter()
    val_loss, done_here = None, 0
    current = recipe.stage_at(step)[0] if step < total else None
    model.train()
    while step < total and (stop_after is None or done_here < stop_after):
        stage, into = recipe.stage_at(step)
        if stage is not current:
            _enter_stage(model, stage)
            current = stage
        seq_len = stage.seq_len or t.seq_len
        lr = learning_rate(step, total_steps=total, peak=t.lr, warmup_steps=t.warmup_steps, schedule=t.schedule,
                           min_ratio=t.min_lr_ratio, decay_fraction=t.decay_fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batch = stage.micro_batch_size or t.micro_batch_size
        rows = micro_batch * t.grad_accum * env.world_size
        batch = loader.next_batch(rows, seq_len, _mixture(stage, into, loader.names), rank=env.rank,
                                  world_size=env.world_size)
        global_tokens = rows * seq_len  # every position has a label in pre-training
        loss_sum = torch.zeros(())
        for micro in range(t.grad_accum):
            part = slice(micro * micro_batch, (micro + 1) * micro_batch)
            sync = micro == t.grad_accum - 1
            with (train_model.no_sync() if env.enabled and not sync else contextlib.nullcontext()):
                with autocast():
                    loss = train_model(batch.input_ids_BT[part], document_ids_BT=batch.document_ids_BT[part],
                                       labels_BT=batch.labels_BT[part], loss_chunk=t.loss_chunk)
                (loss * (env.world_size / global_tokens)).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        done_here += 1
        tokens_seen += global_tokens
        window_tokens += global_tokens
        train_loss = float(all_reduce_sum(loss_sum, env)) / global_tokens
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"step {step}: the loss is {train_loss}; lower [train] lr or check the data")
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.3f}", stage=stage.name)
        if step % t.log_every == 0 or step == total:
            elapsed = time.perf_counter() - window_start
            tps = window_tokens / max(elapsed, 1e-9)
            metrics.write({"step": step, "stage": stage.name, "loss": train_loss, "lr": lr,
                           "grad_norm": float(grad_norm), "tokens": tokens_seen, "tokens_per_s": tps,
                           "mfu": tps * flops_per_token(model.config, seq_len) / peak, "seq_len": seq_len,
                           "epochs": epochs_seen(loader)})
            window_tokens, window_start = 0, time.perf_counter()
        stage_ends = recipe.stage_at(step)[0] is not stage or step == total
        if val_shards and (step % t.eval_every == 0 or stage_ends):
            val_loss = evaluate(model, val_batches(seq_len), autocast, t.loss_chunk)
            metrics.write({"step": step, "stage": stage.name, "val_loss": val_loss, "val_ppl": math.exp(val_loss)})
            bar.write(f"step {step} ({stage.name}): train loss {train_loss:.4f}, val loss {val_loss:.4f}")
        if env.is_main and (step % t.save_every == 0 or step == total):
            save_checkpoint(out, step, model, optimizer, {"step": step, "tokens": tokens_seen,
                                                          "loader": loader.state_dict(), "recipe": recipe.name},
                            keep_last=t.keep_last)
        barrier(env)
    bar.close()
    seconds = time.perf_counter() - started
    baseline = None
    if step >= total and env.is_main:
        from qwen2.checkpoint.loader import Pretrained, save_pretrained
        from qwen2.train.plots import plot_metrics

        save_pretrained(Pretrained(model, tokenizer, {}, str(out)), out / "model", dtype=torch.float32)
        plot_metrics(out / "metrics.jsonl", out)
        if val_shards:
            # on the very batches of the last validation loss
            baseline = unigram_loss([s for shards in sources.values() for s in shards],
                                    val_batches(recipe.stages[-1].seq_len or t.seq_len), model.config.vocab_size)
    return Summary(step, val_loss, baseline, tokens_seen, seconds, out)
