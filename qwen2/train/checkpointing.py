"""Training checkpoints: written whole or not at all, the last N kept, resumed exactly.

`<run>/checkpoints/step_00000120/` holds config.json + model.safetensors (a Hugging Face model
directory: `qwen2 generate --model` and transformers load it as is; a LoRA run saves only its
adapters, adapters.safetensors; an FSDP2 run one shard per process under sharded/), optimizer.pt (AdamW moments and
the torch RNG state) and trainer_state.json (step, data-loader position, metrics so far). Everything
is written into `.step_00000120.tmp/`, flushed, and renamed: a process killed at any moment leaves
either the complete directory or a .tmp that the next run deletes, never a half checkpoint under a
step name. Older checkpoints are deleted only after the new one is in place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from qwen2.checkpoint.safetensors import CheckpointError, save_hf_model
from qwen2.model import Qwen2ForCausalLM

_STEP_DIR = re.compile(r"step_(\d{8})")
ADAPTERS = "adapters.safetensors"
SHARDED = "sharded"  # an FSDP2 checkpoint: torch.distributed.checkpoint files, one set per process


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run (stale .tmp directories are removed)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    for stale in root.glob(".step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    steps = sorted(p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and (p / "trainer_state.json").is_file())
    return steps[-1] if steps else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, model: Qwen2ForCausalLM, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], *, keep_last: int) -> Path:
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainable = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    if len(trainable) < len(list(model.parameters())):
        # Adapters (LoRA): only what trains is saved; the frozen base is the recipe's init model.
        save_file(trainable, tmp / ADAPTERS)
    else:
        save_hf_model(model, tmp, dtype=torch.float32)
    torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    for file in tmp.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    _failpoint(step)
    _publish(tmp, final, keep_last)
    return final


def _failpoint(step: int) -> None:
    """Fault injection for the crash tests: QWEN2_KILL_IN_SAVE=N kills the process with SIGKILL in
    the middle of saving step N (files written, not yet renamed into place)."""
    if os.environ.get("QWEN2_KILL_IN_SAVE") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def _publish(tmp: Path, final: Path, keep_last: int) -> None:
    """Rename a complete temporary checkpoint into place, then drop all but the last `keep_last`."""
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (a resumed run): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    complete = sorted(p for p in final.parent.iterdir() if _STEP_DIR.fullmatch(p.name))
    for old in complete[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether the model's parameters are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def save_sharded_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            state: dict[str, Any], *, keep_last: int, rank: int) -> Path:
    """FSDP2: every process writes its own shards (torch.distributed.checkpoint) into the same
    temporary directory; rank 0 adds trainer_state.json and renames it into place once all are done."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=tmp / SHARDED)
    dist.barrier()
    if rank == 0:
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        _publish(tmp, final, keep_last)
    dist.barrier()
    return final


def load_checkpoint(path: Path, model: Qwen2ForCausalLM, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore model weights (strictly: every name and shape), optimizer and torch RNG; return the
    trainer state. The model's config (rope_theta etc.) must already be the checkpoint's. A sharded
    (FSDP2) checkpoint loads into a model sharded the same way or differently (resharding)."""
    if (path / SHARDED).is_dir():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                             set_model_state_dict, set_optimizer_state_dict)

        if not is_sharded(model):
            raise CheckpointError(f"{path}: a sharded (FSDP) checkpoint; resume it with parallel = \"fsdp\" under torchrun")
        target = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.load(target, checkpoint_id=path / SHARDED)
        set_model_state_dict(model, target["model"])
        set_optimizer_state_dict(model, optimizer, target["optimizer"])
        return json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    adapters = (path / ADAPTERS).is_file()
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        weights = load_file(path / (ADAPTERS if adapters else "model.safetensors"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({e})") from None
    if adapters:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(weights) != trainable:
            raise CheckpointError(f"{path}: its adapters do not fit the model ({len(weights)} tensors saved, "
                                  f"{len(trainable)} trainable; different LoRA settings?)")
        model.load_state_dict(weights, strict=False)
    elif model.config.tie_word_embeddings and hasattr(model, "lm_head"):  # a reward model has no head to tie
        weights.setdefault("lm_head.weight", weights["model.embed_tokens.weight"])
    if not adapters:
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{path}: weights do not fit the model (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]})")
        model.tie_weights()
    if optimizer is not None:
        saved = torch.load(path / "optimizer.pt", weights_only=True)  # tensors and numbers only, no pickled code
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["torch_rng"])
    return state
