"""Online DPO on a tiny model, with AdamW, OnDARE and OnTIES: reward up, alignment tax measured.

    python benchmarks/online_merging.py --out runs/online-merging

1. A BBPE tokenizer and a tiny Qwen2 (random init: the "base") on two SFT tasks: adding numbers
   (the rewarded task) and reversing made-up words (the task online training does not see).
2. SFT of the base on both tasks (a short run, so that addition is only partly learned).
3. Online DPO from the SFT model on fresh addition prompts, rewarded by the exact-answer verifier:
   k samples per prompt, best vs worst, for a number of iterations; three times: AdamW, OnDARE,
   OnTIES (tau_ref = SFT - base).
4. For each: the mean reward of the samples per iteration, greedy accuracy on held-out addition
   problems, and the SFT loss on held-out word reversals before and after (the alignment tax).
Results -> results.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import sys
from pathlib import Path

import torch

SFT_RECIPE = """
name = "tiny-sft"
seed = 0
[model]
init = "base"
[data]
conversations = "sft.jsonl"
val = "reverse_val.jsonl"
[train]
seq_len = 256
micro_batch_size = 16
grad_accum = 1
lr = 3e-3
warmup_steps = 20
schedule = "cosine"
weight_decay = 0.0
save_every = 100000
log_every = 50
eval_every = 100
dtype = "float32"
threads = {threads}
[[stage]]
name = "sft"
steps = {steps}
"""

ONLINE_RECIPE = """
name = "tiny-online-{merge}"
seed = 0
[model]
init = "sft/model"
[data]
prompts = "online_prompts.jsonl"
val = "reverse_val.jsonl"
[train]
seq_len = 128
micro_batch_size = 16
grad_accum = 1
lr = {lr}
warmup_steps = 1
schedule = "constant"
weight_decay = 0.0
save_every = 100000
log_every = 1
eval_every = {eval_every}
dtype = "float32"
threads = {threads}
[dpo]
beta = {beta}
[online]
reward = "maths"
k = 8
prompts_per_iteration = 16
steps_per_iteration = 1
temperature = {temperature}
max_new_tokens = 8
eval_prompts = "eval_prompts.jsonl"
{merge_settings}
[[stage]]
name = "online"
steps = {iterations}
"""


def addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(1, 19)
    return f"What is {a} + {b}?", str(a + b)


def word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 5)))


def conversation(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def prepare(out: Path, threads: int, sft_steps: int) -> None:
    from qwen2.checkpoint.loader import Pretrained, save_pretrained
    from qwen2.config import PRESETS
    from qwen2.model import Qwen2ForCausalLM
    from qwen2.tokenizer.trainer import TrainerConfig, train_tokenizer

    rng = random.Random(0)
    problems, seen = [], set()
    while len(problems) < 1700:
        q, a = addition(rng)
        if q not in seen:
            seen.add(q)
            problems.append((q, a))
    sft_add, online_add, eval_add = problems[:900], problems[900:1500], problems[1500:]
    words = list({word(rng) for _ in range(4000)})
    sft_words, val_words = words[:900], words[900:1100]
    sft = [conversation(q, a) for q, a in sft_add] + [conversation(f"Reverse the word: {w}", w[::-1]) for w in sft_words]
    random.Random(1).shuffle(sft)
    write_jsonl(out / "sft.jsonl", sft)
    write_jsonl(out / "reverse_val.jsonl", [conversation(f"Reverse the word: {w}", w[::-1]) for w in val_words])
    write_jsonl(out / "online_prompts.jsonl", [{"messages": [{"role": "user", "content": q}], "answer": a}
                                               for q, a in online_add])
    write_jsonl(out / "eval_prompts.jsonl", [{"messages": [{"role": "user", "content": q}], "answer": a}
                                             for q, a in eval_add])
    texts = [c["messages"][0]["content"] + "\n" + c["messages"][1]["content"] for c in sft]
    tokenizer = train_tokenizer(texts, TrainerConfig(vocab_size=384, show_progress=False))
    config = dataclasses.replace(PRESETS["tiny"], vocab_size=448, hidden_size=128, intermediate_size=384,
                                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                 max_window_layers=4, eos_token_id=tokenizer.eos_token_id,
                                 bos_token_id=tokenizer.eos_token_id)
    base = Qwen2ForCausalLM(config)
    base.init_weights(seed=0)
    save_pretrained(Pretrained(base, tokenizer), out / "base")
    (out / "sft.toml").write_text(SFT_RECIPE.format(threads=threads, steps=sft_steps), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/online-merging")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sft-steps", type=int, default=1500)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--reserve-p", type=float, default=0.5)
    parser.add_argument("--alpha", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--merges", default="none,dare,ties", help="comma-separated: none (AdamW), dare, ties")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    from qwen2.train.online import run_online
    from qwen2.train.recipe import load_recipe
    from qwen2.train.sft import run_sft

    if not (out / "base" / "config.json").exists():
        prepare(out, args.threads, args.sft_steps)
    if not (out / "sft" / "model" / "config.json").exists():
        run_sft(load_recipe(out / "sft.toml"), out / "sft", progress=False)
    results = {}
    for merge in args.merges.split(","):
        settings = "" if merge == "none" else (f'merge = "{merge}"\nbase = "base"\nreserve_p = {args.reserve_p}\n'
                                               f"alpha = {args.alpha}")
        recipe_path = out / f"online-{merge}.toml"
        recipe_path.write_text(ONLINE_RECIPE.format(merge=merge, lr=args.lr, threads=args.threads, beta=args.beta,
                                                    temperature=args.temperature,
                                                    merge_settings=settings, iterations=args.iterations,
                                                    eval_every=max(1, args.iterations // 5)),
                               encoding="utf-8")
        run = out / f"online-{merge}"
        shutil.rmtree(run, ignore_errors=True)  # a fresh run each time (settings may have changed)
        result = run_online(load_recipe(recipe_path), run, progress=False)
        rewards = {}
        for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if "sample_reward" in record:
                rewards[record["iteration"]] = record["sample_reward"]
        results[merge] = {"before": result["before"], "after": result["after"],
                          "sample_reward": [rewards[i] for i in sorted(rewards)], "seconds": result["seconds"]}
        print(f"{merge}: {json.dumps(results[merge]['after'])}", file=sys.stderr, flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print("| optimizer | mean sample reward, first -> last fifth of the iterations | held-out greedy accuracy "
          "before -> after | reversal SFT loss before -> after (the tax) |")
    print("|---|---|---|---|")
    for merge, r in results.items():
        fifth = max(1, len(r["sample_reward"]) // 5)
        first, last = r["sample_reward"][:fifth], r["sample_reward"][-fifth:]
        print(f"| {merge} | {sum(first) / len(first):.3f} -> {sum(last) / len(last):.3f} | "
              f"{r['before']['eval_reward']:.3f} -> {r['after']['eval_reward']:.3f} | "
              f"{r['before']['sft_val_loss']:.4f} -> {r['after']['sft_val_loss']:.4f} |")

if __name__ == "__main__":
    main()
