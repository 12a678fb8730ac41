"""The one training loop: every stage (pre-training, SFT, DPO) is a Task that supplies batches and a
loss; the loop owns everything else.

A step: the task hands this process its micro-batches for the step (it draws the global batch
alike on every process and keeps its rows); each micro-batch's summed loss is scaled by
processes / (loss units in the global batch: tokens, or preference pairs), so after DDP's
averaging the gradient is that of the global mean whatever the process count or the split into
micro-batches. bf16 autocast with float32 master weights, AdamW (no decay on norms and biases;
frozen parameters, e.g. a LoRA base, are left out), clipping, and a learning rate computed from the
step alone. metrics.jsonl, validation, atomic checkpoints and exact resume come with it.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from qwen2.config import Qwen2Config
from qwen2.model import Qwen2ForCausalLM
from qwen2.train.checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from qwen2.train.distributed import DistEnv, all_reduce_sum, barrier
from qwen2.train.recipe import Recipe
from qwen2.train.schedule import learning_rate


class Task(Protocol):
    def prepare_step(self, model: Qwen2ForCausalLM, step: int) -> None:
        """Anything the step needs first (a new stage's RoPE base, ...); called before batches()."""

    def batches(self, step: int, env: DistEnv) -> list[Any]:
        """This process's micro-batches for optimizer step `step` (0-based)."""

    def count(self, micro: Any) -> float:
        """Loss units (label tokens, pairs) in a micro-batch of this process."""

    def loss(self, model: torch.nn.Module, micro: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """(summed loss over the micro-batch's units, summed metrics to report per unit)."""

    def evaluate(self, model: Qwen2ForCausalLM, step: int) -> dict[str, float]:
        """Validation metrics (may be empty)."""

    def should_evaluate(self, step: int) -> bool: ...

    def describe(self, step: int) -> dict[str, Any]:
        """Fields for the metrics record of `step` (stage name, sequence length, epochs, ...)."""

    def flops_per_unit(self, model: Qwen2ForCausalLM) -> float: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class LoopResult:
    steps: int
    units: float
    seconds: float
    last_eval: dict[str, float]


def start_run(recipe: Recipe, out: str | Path) -> tuple[Path, DistEnv]:
    """The run directory (created), the process group (under torchrun), threads and seed."""
    from qwen2.train.distributed import init_distributed

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    env = init_distributed()
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    torch.manual_seed(recipe.seed)
    return out, env


def shard_model(model: Qwen2ForCausalLM, recipe: Recipe, env: DistEnv) -> Qwen2ForCausalLM:
    """FSDP2 under torchrun when the recipe asks (each decoder layer its own unit, the rest the
    root): call before make_optimizer, so the optimizer holds the shards."""
    if env.enabled and recipe.train.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0 (gathered from FSDP shards if need be)."""
    from qwen2.train.checkpointing import is_sharded

    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def make_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.AdamW:
    t = recipe.train
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)  # norms and biases are not decayed
    return torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)


def autocast_for(recipe: Recipe) -> Callable[[], Any]:
    if recipe.train.dtype == "float32":
        return contextlib.nullcontext
    return lambda: torch.autocast("cpu", dtype=torch.bfloat16)


def flops_per_token(config: Qwen2Config, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (non-embedding parameters + LM head) + attention (PaLM's 12 L H Q T / 2
    for a causal mask is not subtracted: the usual convention)."""
    D, L, F = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = config.num_key_value_heads * config.dim_per_head
    per_layer = D * D + 2 * D * kv + D * D + 3 * D * F
    return 6 * (L * per_layer + D * config.vocab_size) + 12 * L * D * seq_len


# ----------------------------------------------------------------------------------------------------
# The loop


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


@torch.no_grad()
def mean_loss(task: Task, model: Qwen2ForCausalLM, batches: list[Any], autocast: Callable[[], Any]) -> float:
    """The task's loss per unit over fixed batches, in eval mode (validation)."""
    model.eval()
    total, count = 0.0, 0.0
    for batch in batches:
        with autocast():
            total += float(task.loss(model, batch)[0])
        count += task.count(batch)
    model.train()
    return total / max(count, 1.0)


class MetricsLog:
    """metrics.jsonl, append-only; on resume the records after the checkpoint's step are dropped,
    so the file reads as one uninterrupted run. With TensorBoard installed, the numbers also go to
    <run>/tensorboard/ (event files, for `tensorboard --logdir`)."""

    def __init__(self, path: Path, resume_step: int, enabled: bool) -> None:
        self.path, self.enabled, self.board = path, enabled, None
        if enabled and path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                # Event files are named by the second the writer opens (and host and pid): a run resumed
                # within the same second in the same process would reuse, and overwrite, the previous
                # file. A unique suffix keeps every part of a resumed run.
                self.board = SummaryWriter(str(path.parent / "tensorboard"), purge_step=resume_step + 1,
                                           filename_suffix=f".{time.time_ns()}")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.board is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.board.add_scalar(key, value, record["step"])
            self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def resume(out: Path, model: Qwen2ForCausalLM, optimizer: torch.optim.Optimizer, task: Task,
           before_load: Callable[[int], None] | None = None) -> tuple[int, float]:
    """Load the newest checkpoint of `out`, if any: (step, units so far); else (0, 0)."""
    latest = latest_checkpoint(out)
    if latest is None:
        return 0, 0.0
    step = json.loads((latest / "trainer_state.json").read_text(encoding="utf-8"))["step"]
    if before_load is not None:
        before_load(step)  # e.g. the checkpoint's RoPE base, before its weights load
    state = load_checkpoint(latest, model, optimizer)
    task.load_state_dict(state["task"])
    return state["step"], state["units"]


def train(task: Task, model: Qwen2ForCausalLM, optimizer: torch.optim.Optimizer, recipe: Recipe, out: Path,
          env: DistEnv, *, start_step: int = 0, units: float = 0.0, progress: bool = True,
          stop_after: int | None = None, unit_name: str = "tokens") -> LoopResult:
    from tqdm import tqdm

    t = recipe.train
    from qwen2.train.checkpointing import is_sharded, save_sharded_checkpoint

    sharded = is_sharded(model)
    train_model: torch.nn.Module = model
    if env.enabled and not sharded:
        train_model = torch.nn.parallel.DistributedDataParallel(model)
    autocast = autocast_for(recipe)
    metrics = MetricsLog(out / "metrics.jsonl", start_step, env.is_main)
    peak = measured_peak_flops(torch.bfloat16 if t.dtype == "bfloat16" else torch.float32) if env.is_main else 1.0
    total = recipe.total_steps
    bar = tqdm(total=total, initial=start_step, desc=recipe.name, disable=not (progress and env.is_main), unit="step")
    step, done_here, last_eval = start_step, 0, {}
    started, window_units, window_steps, window_start = time.perf_counter(), 0.0, 0, time.perf_counter()
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    while step < total and (stop_after is None or done_here < stop_after):
        task.prepare_step(model, step)
        lr = learning_rate(step, total_steps=total, peak=t.lr, warmup_steps=t.warmup_steps, schedule=t.schedule,
                           min_ratio=t.min_lr_ratio, decay_fraction=t.decay_fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = task.batches(step, env)
        global_units = float(all_reduce_sum(torch.tensor(sum(task.count(m) for m in micro_batches), dtype=torch.float64),
                                            env))
        loss_sum, sums = torch.zeros((), dtype=torch.float64), {}
        for i, micro in enumerate(micro_batches):
            sync = i == len(micro_batches) - 1
            if sharded:
                model.set_requires_gradient_sync(sync)  # FSDP2: reduce-scatter on the last micro-batch only
            with (train_model.no_sync() if env.enabled and not sharded and not sync else contextlib.nullcontext()):
                with autocast():
                    loss, micro_metrics = task.loss(train_model, micro)
                (loss * (env.world_size / max(global_units, 1.0))).backward()
            loss_sum += loss.detach().double()
            for key, value in micro_metrics.items():
                sums[key] = sums.get(key, 0.0) + value
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        done_here += 1
        units += global_units
        window_units += global_units
        window_steps += 1
        train_loss = float(all_reduce_sum(loss_sum, env)) / max(global_units, 1.0)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"step {step}: the loss is {train_loss}; lower [train] lr or check the data")
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.3f}")
        if step % t.log_every == 0 or step == total:
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            rate = window_units / elapsed
            extra = {k: float(all_reduce_sum(torch.tensor(v, dtype=torch.float64), env)) / max(global_units, 1.0)
                     for k, v in sorted(sums.items())}
            metrics.write({"step": step, **task.describe(step - 1), "loss": train_loss, "lr": lr,
                           "grad_norm": float(grad_norm), unit_name: units, f"{unit_name}_per_s": rate,
                           "step_seconds": elapsed / window_steps,
                           "mfu": rate * task.flops_per_unit(model) / peak, **extra})
            window_units, window_steps, window_start = 0.0, 0, time.perf_counter()
        if task.should_evaluate(step) or step == total:
            last_eval = task.evaluate(model, step)
            if last_eval:
                metrics.write({"step": step, **task.describe(step - 1), **last_eval})
                if env.is_main:
                    bar.write(f"step {step}: train loss {train_loss:.4f}, " +
                              ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
        if step % t.save_every == 0 or step == total:
            state = {"step": step, "units": units, "task": task.state_dict(), "recipe": recipe.name}
            if sharded:
                save_sharded_checkpoint(out, step, model, optimizer, state, keep_last=t.keep_last, rank=env.rank)
            elif env.is_main:
                save_checkpoint(out, step, model, optimizer, state, keep_last=t.keep_last)
        barrier(env)
    bar.close()
    metrics.close()
    return LoopResult(step, units, time.perf_counter() - started, last_eval)
