"""One round of maths rejection sampling + LoRA SFT on the demo model, measured on held-out problems.

    python benchmarks/maths_rejection_sampling.py --out runs/maths-rs [--eval 200 --problems 120 --k 4]

Steps (each skipped when its output exists, so an interrupted run continues):
1. `qwen2 eval maths` on the held-out set (greedy, bf16): accuracy before;
2. `qwen2 synth math`: k samples per training problem, the right ones kept;
3. `qwen2 train sft` with LoRA on the kept conversations (merged export);
4. `qwen2 eval maths` on the same held-out set with the tuned model: accuracy after;
then the paired difference (same problems before and after) with its 95% interval -> results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

RECIPE = """\
name = "maths-rejection-sampling-sft"
seed = 0
[model]
init = "demo"
[data]
conversations = "{conversations}"
[train]
seq_len = 1024
micro_batch_size = 1
grad_accum = 4
lr = {lr}
warmup_steps = 2
schedule = "constant"
weight_decay = 0.0
dtype = "bfloat16"
save_every = 1000
log_every = 1
eval_every = 100000
threads = {threads}
[lora]
r = 16
alpha = 32.0
dropout = 0.05
[[stage]]
name = "sft"
steps = {steps}
"""


def qwen2(*args: str) -> None:
    command = [sys.executable, "-m", "qwen2", *args]
    print("$ " + " ".join(command), file=sys.stderr, flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    print(f"  ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/maths-rs")
    parser.add_argument("--eval", type=int, default=200, help="held-out problems")
    parser.add_argument("--problems", type=int, default=120, help="training problems sampled")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--dtype", "bfloat16", "--threads", str(args.threads)]
    if not (out / "before.json").exists():
        qwen2("eval", "maths", *common, "--problems", str(args.eval), "--out", str(out / "before.json"))
    synth = out / "synth" / "maths.jsonl"
    if not (out / "synth" / "maths.summary.json").exists():
        qwen2("synth", "math", *common, "--problems", str(args.problems), "--k", str(args.k), "--out", str(synth))
    tuned = out / "sft" / "model"
    if not (tuned / "config.json").exists():
        conversations = [json.loads(line) for line in synth.read_text(encoding="utf-8").splitlines()]
        tokens = sum(len(c["messages"][-1]["content"]) / 3.2 + 60 for c in conversations)  # rough, for the step count
        steps = max(1, math.ceil(args.epochs * tokens / 4096))
        recipe = out / "sft.toml"
        recipe.write_text(RECIPE.format(conversations=synth.resolve(), lr=args.lr, threads=args.threads, steps=steps),
                          encoding="utf-8")
        qwen2("train", "sft", "--recipe", str(recipe), "--out", str(out / "sft"))
    if not (out / "after.json").exists():
        qwen2("eval", "maths", *common, "--model", str(tuned), "--problems", str(args.eval), "--out", str(out / "after.json"))

    from qwen2.eval.maths import paired_difference

    before, after = (json.loads((out / f).read_text(encoding="utf-8")) for f in ("before.json", "after.json"))
    summary = json.loads((out / "synth" / "maths.summary.json").read_text(encoding="utf-8"))
    paired = paired_difference([r["correct"] for r in before["records"]], [r["correct"] for r in after["records"]])
    results = {"before": before["overall"], "after": after["overall"], "paired": paired,
               "by_kind": {k: {"before": before["by_kind"][k], "after": after["by_kind"][k]} for k in before["by_kind"]},
               "synthesis": {k: summary[k] for k in ("problems", "samples", "verdicts", "sample_accuracy",
                                                     "problems_solved", "kept_conversations", "preference_pairs")}}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
