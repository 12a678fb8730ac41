"""Training speed and loss-memory, side by side with transformers in one process.

1. Throughput: the tiny-shakespeare recipe's model (~12M parameters, 8,192-token vocabulary, tied
   embeddings; then the same with Qwen2's 151,936-token vocabulary), the same initial weights in qwen2 and in transformers' Qwen2ForCausalLM, the same
   batches (packed Shakespeare windows of 256 tokens, 16 per step), bf16 autocast, AdamW with the
   same settings. Steps alternate between the two (so machine noise hits both alike); tokens/s are
   medians over the timed steps, and the losses of both runs are printed side by side (they must
   track each other: the same model trained on the same data).
2. Cross-entropy memory at sequence 4,096 with Qwen2's 151,936-token vocabulary and hidden size 896
   (the 0.5B model's head): peak RSS of one forward + backward of the loss alone, in a fresh
   process per variant: qwen2's chunked cross-entropy vs logits + F.cross_entropy.

Usage: python benchmarks/bench_training.py [--steps 40] [--warmup 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def batches(seq_len: int, rows: int, count: int):
    from qwen2.data.corpora import corpus_documents
    from qwen2.data.shards import TokenShard, pack_documents
    from qwen2.demo import cache_dir
    from qwen2.tokenizer import Tokenizer
    from qwen2.tokenizer.trainer import TrainerConfig, train_tokenizer
    from qwen2.train.data import MixtureLoader

    root = cache_dir() / "bench_training"
    if not (root / "train").is_dir():
        documents = corpus_documents("shakespeare", cache_dir() / "corpora")
        tokenizer = train_tokenizer([d.text for d in documents], TrainerConfig(vocab_size=8192, show_progress=False))
        tokenizer.save(root / "tokenizer")
        pack_documents(documents, Tokenizer.from_dir(root / "tokenizer"), root)
    shards = [TokenShard.open(p) for p in sorted((root / "train").glob("*.json"))]
    loader = MixtureLoader({"plays": shards}, seed=0)
    return [loader.next_batch(rows, seq_len, {"plays": 1.0}) for _ in range(count)]


def throughput(steps: int, warmup: int, vocab_size: int) -> None:
    import transformers

    from qwen2.model import Qwen2ForCausalLM
    from qwen2.train.pretrain import model_config
    from qwen2.train.recipe import load_recipe

    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "tiny-shakespeare.toml")

    class Vocab:  # model_config only needs the tokenizer's size and eos
        eos_token_id = 8189

    Vocab.vocab_size = vocab_size
    config = model_config(recipe, Vocab())
    reference = Qwen2ForCausalLM(config)
    reference.init_weights(seed=0)
    ours, ours_compiled = copy.deepcopy(reference), copy.deepcopy(reference)
    for layer in ours_compiled.model.layers:
        layer.compile()
    hf_config = transformers.Qwen2Config(**{k: v for k, v in config.to_dict().items() if k != "architectures"})
    theirs = transformers.Qwen2ForCausalLM(hf_config)
    theirs.load_state_dict(reference.state_dict(), strict=False)
    theirs.tie_weights()
    params = sum(p.numel() for p in reference.parameters())
    t = recipe.train
    data = batches(t.seq_len, t.micro_batch_size, steps + warmup)

    def optimizer(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)

    runs = {"qwen2": (ours, optimizer(ours)), "qwen2, compiled layers": (ours_compiled, optimizer(ours_compiled)),
            "transformers": (theirs, optimizer(theirs))}
    times = {name: [] for name in runs}
    losses = {name: [] for name in runs}
    for i, batch in enumerate(data):
        for name, (model, opt) in runs.items():
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                if name.startswith("qwen2"):
                    loss = model(batch.input_ids_BT, labels_BT=batch.labels_BT) / batch.num_tokens
                else:
                    logits = model(input_ids=batch.input_ids_BT).logits
                    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.labels_BT.flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - started
            if i >= warmup:
                times[name].append(elapsed)
            losses[name].append(loss.item())
    tokens = t.micro_batch_size * t.seq_len
    print(f"\nvocabulary {vocab_size}: {params / 1e6:.1f}M parameters, batch {t.micro_batch_size} x {t.seq_len} tokens, "
          f"bf16 autocast, {steps} timed steps after {warmup} warm-up, {torch.get_num_threads()} threads\n")
    print("| implementation | tokens/s (median) | ms/step | vs transformers | loss at step 1 / last |")
    print("|---|---|---|---|---|")
    base = statistics.median(times["transformers"])
    for name in runs:
        med = statistics.median(times[name])
        print(f"| {name} | {tokens / med:.0f} | {1000 * med:.0f} | {base / med:.2f}x | "
              f"{losses[name][0]:.3f} / {losses[name][-1]:.3f} |")
    print("losses every 5 steps (qwen2, compiled, transformers):",
          [tuple(round(x, 3) for x in row) for row in list(zip(*losses.values()))[::5]])


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def loss_memory_child(variant: str) -> None:
    from qwen2.model.loss import chunked_cross_entropy, naive_cross_entropy

    T, D, V = 4096, 896, 151936
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(T, D, generator=gen).requires_grad_()
    w = (torch.randn(V, D, generator=gen) * 0.02).requires_grad_()
    labels = torch.randint(0, V, (T,), generator=gen)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    base = _status_kib("VmRSS")
    started = time.perf_counter()
    loss = chunked_cross_entropy(h, w, labels) if variant == "chunked" else naive_cross_entropy(h, w, labels)
    loss.backward()
    elapsed = time.perf_counter() - started
    peak = _status_kib("VmHWM")
    print(json.dumps({"variant": variant, "extra_peak_mib": (peak - base) / 1024, "seconds": elapsed,
                      "loss": loss.item() / T}))


def loss_memory() -> None:
    print("\nCross-entropy, forward + backward, T=4096, V=151936, D=896, float32 inputs and weight "
          "(peak RSS above the inputs, fresh process each)\n")
    print("| variant | extra peak memory (MiB) | seconds | mean loss |")
    print("|---|---|---|---|")
    for variant in ("chunked", "naive"):
        out = subprocess.run([sys.executable, __file__, "--loss-memory-child", variant], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"| {variant} | failed: {out.stderr.strip()[-200:]} | | |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        name = "qwen2 chunked_cross_entropy" if variant == "chunked" else "logits + F.cross_entropy"
        print(f"| {name} | {r['extra_peak_mib']:.0f} | {r['seconds']:.2f} | {r['loss']:.4f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--loss-memory-child", default=None)
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    if args.loss_memory_child:
        loss_memory_child(args.loss_memory_child)
    else:
        torch.set_num_threads(min(2, torch.get_num_threads()))
        if not args.skip_throughput:
            for vocab_size in (8192, 151936):  # the recipe's vocabulary, and Qwen2's
                throughput(args.steps, args.warmup, vocab_size)
        loss_memory()
