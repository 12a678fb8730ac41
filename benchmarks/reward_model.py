"""A reward model on synthesised preference pairs, judged on held-out pairs.

    python benchmarks/reward_model.py --pairs runs/maths-rs/synth/maths.preferences.jsonl [more files] \
        --out runs/reward-model

The pairs are split by prompt (a hash of the prompt text: every pair of one problem on one side),
80% to train, 20% held out; `qwen2 train reward` trains the demo model's backbone with LoRA and a
new scalar head (Bradley-Terry) and reports ranking accuracy on both sides before and after.
Results -> results.json (with a 95% Wilson interval on the held-out accuracy).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

RECIPE = """\
name = "reward-model"
seed = 0
[model]
init = "demo"
[data]
preferences = "{train}"
val = "{val}"
[train]
seq_len = 1024
micro_batch_size = 2
grad_accum = 4
lr = {lr}
warmup_steps = 2
schedule = "constant"
weight_decay = 0.0
dtype = "bfloat16"
save_every = 1000
log_every = 1
eval_every = {eval_every}
threads = {threads}
[lora]
r = 16
alpha = 32.0
[[stage]]
name = "reward"
steps = {steps}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", required=True)
    parser.add_argument("--out", default="runs/reward-model")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, val = [], []
    for path in args.pairs:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            pair = json.loads(line)
            key = json.dumps(pair["prompt"], sort_keys=True)
            (val if hashlib.sha256(key.encode()).digest()[0] < 52 else train).append(pair)  # ~20% held out
    for name, rows in (("train", train), ("val", val)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    steps = max(1, math.ceil(args.epochs * len(train) / 8))
    (out / "reward.toml").write_text(RECIPE.format(train=(out / "train.jsonl").resolve(), val=(out / "val.jsonl").resolve(),
                                                   lr=args.lr, threads=args.threads, steps=steps,
                                                   eval_every=max(1, steps // 4)), encoding="utf-8")
    print(f"{len(train)} training pairs, {len(val)} held out; {steps} steps", file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, "-m", "qwen2", "train", "reward", "--recipe", str(out / "reward.toml"),
                           "--out", str(out / "run")], capture_output=True, text=True)
    sys.stderr.write(done.stderr[-3000:])
    if done.returncode:
        raise SystemExit(done.returncode)
    from qwen2.eval.maths import wilson_interval

    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["val_accuracy"]) for r in records if "val_accuracy" in r]
    final = curve[-1][1]
    right = round(final * len(val))
    results = {"train_pairs": len(train), "val_pairs": len(val), "steps": steps, "val_accuracy_curve": curve,
               "val_accuracy": final, "val_ci95": wilson_interval(right, len(val)),
               "summary_line": done.stderr.strip().splitlines()[-2:]}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
