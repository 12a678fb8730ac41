"""LoRA SFT on the demo 0.5B model on this CPU: does it fit, how fast, how much memory.

Conversations built from real text: questions about Python standard-library functions, answered by
the first sentence of each function's docstring. LoRA r=8 on every projection of every layer,
float32 master weights with bf16 autocast, sequences of up to 256 tokens. Reports trainable
parameters, seconds per step, the loss per step and the process's peak RSS (VmHWM).

Usage: python benchmarks/bench_lora_sft.py [--steps 4] [--micro-batch 2] [--checkpointing]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import tempfile
import time
from pathlib import Path

import torch

MODULES = ["textwrap", "json", "os.path", "shutil", "itertools", "functools", "statistics", "string", "heapq",
           "bisect", "base64", "fnmatch", "glob", "difflib", "calendar", "zlib"]


def conversations() -> list[dict]:
    out = []
    for name in MODULES:
        module = importlib.import_module(name)
        for fn_name, fn in sorted(vars(module).items()):
            doc = inspect.getdoc(fn) if callable(fn) and not fn_name.startswith("_") else None
            if doc and len(doc.split(".")[0]) > 20:
                out.append({"messages": [{"role": "user", "content": f"In Python, what does {name}.{fn_name} do?"},
                                         {"role": "assistant", "content": doc.split(".")[0].strip() + "."}]})
                break
    return out


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    args = parser.parse_args()
    from qwen2.train.recipe import load_recipe
    from qwen2.train.sft import run_sft

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = conversations()
        (root / "c.jsonl").write_text("\n".join(json.dumps(c) for c in data), encoding="utf-8")
        (root / "r.toml").write_text(f"""
name = "lora-sft-demo"
[model]
init = "demo"
[data]
conversations = "c.jsonl"
[train]
seq_len = 256
micro_batch_size = {args.micro_batch}
lr = 2e-4
warmup_steps = 1
schedule = "constant"
save_every = 1000
log_every = 1
dtype = "bfloat16"
activation_checkpointing = {str(args.checkpointing).lower()}
[lora]
r = 8
alpha = 16.0
[[stage]]
name = "sft"
steps = {args.steps}
""", encoding="utf-8")
        started = time.perf_counter()
        result = run_sft(load_recipe(root / "r.toml"), root / "run", progress=False)
        records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    print(f"\n{len(data)} conversations, micro-batch {args.micro_batch} x 256 tokens, activation checkpointing "
          f"{'on' if args.checkpointing else 'off'}, {torch.get_num_threads()} threads\n")
    print("| trainable parameters | s/step (median) | loss by step | peak RSS (MiB) | total s (load + train + export) |")
    print("|---|---|---|---|---|")
    seconds = sorted(r["step_seconds"] for r in steps)
    losses = ", ".join(f"{r['loss']:.3f}" for r in steps)
    print(f"| {result['trainable'] / 1e6:.2f}M | {seconds[len(seconds) // 2]:.1f} | "
          f"{losses} | {peak_rss_mib():.0f} | {time.perf_counter() - started:.0f} |")


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main()
