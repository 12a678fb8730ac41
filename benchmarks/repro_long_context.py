"""Small-scale reproduction of the report's long-context claim: YaRN + Dual Chunk Attention extend a
model's context with no training, where plain RoPE falls apart.

Takes the model of `qwen2 train pretrain --recipe recipes/long-context-repro.toml` (trained on
256-token sequences only, RoPE base 10,000) and measures perplexity on its held-out plays (the
validation shards, never trained on) in windows of 256 to 4,096 tokens, with plain RoPE, static
YaRN (factor 16 = 4,096 / 256), length-adaptive YaRN, DCA (chunk 256) and YaRN + DCA (DCA with
YaRN's temperature). Every window is a run of consecutive tokens inside one play, scored whole.
A second table splits the longest windows by token position: the perplexity of the tokens at
positions [0, 256), [256, 512), ... shows where a variant gains from the longer context and where
plain RoPE meets distances it never saw. Writes the markdown tables and a plot.

Usage: python benchmarks/repro_long_context.py --run runs/long-context-repro [--out docs]
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import numpy as np
import torch

LENGTHS = (256, 512, 1024, 2048, 4096)


def held_out_windows(run: Path, length: int, windows: int) -> list[torch.Tensor]:
    """Up to `windows` windows of `length` consecutive tokens, each inside one held-out document."""
    from qwen2.data.shards import TokenShard, find_shards

    out = []
    for sidecar in find_shards(run / "data" / "val" / "modern-*.json"):
        shard = TokenShard.open(sidecar)
        starts = [int(s) for s in shard.doc_starts] + [shard.num_tokens]
        for a, b in zip(starts, starts[1:]):
            for s in range(a, b - length + 1, length):
                out.append(torch.from_numpy(np.asarray(shard.tokens[s:s + length], dtype=np.int64)))
                if len(out) == windows:
                    return out
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default="runs/long-context-repro")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--windows", type=int, default=8, help="windows per length (the same text for every variant)")
    parser.add_argument("--dca-local", type=int, default=32, help="DCA local_size (chunk_size is the trained 256)")
    args = parser.parse_args()

    from qwen2.checkpoint import load_pretrained
    from qwen2.eval.long_context import configure_long_context, token_nll

    torch.set_num_threads(2)
    run = Path(args.run)
    base = load_pretrained(run / "model", dtype=torch.float32)
    trained = base.model.config.max_position_embeddings
    factor = max(LENGTHS) / trained
    variants = {
        "plain RoPE": {},
        f"YaRN (static, x{factor:g})": {"yarn": factor},
        "YaRN (length-adaptive)": {"yarn": factor, "adaptive": True},
        "DCA": {"dca": True, "dca_local_size": args.dca_local},
        "YaRN + DCA": {"yarn": factor, "dca": True, "dca_local_size": args.dca_local},
    }
    # the same windows for every variant: the first `windows` windows of each length
    texts = {n: held_out_windows(run, n, args.windows) for n in LENGTHS}
    print(f"model trained at {trained} tokens; windows per length: "
          + ", ".join(f"{n}: {len(texts[n])}" for n in LENGTHS), flush=True)
    results: dict[str, dict[int, float]] = {}
    # positions of the longest windows: [0, trained), [trained, 2 trained), ... doubling
    edges = [0] + [n for n in LENGTHS]
    by_position: dict[str, list[float]] = {}
    started = time.perf_counter()
    for name, switches in variants.items():
        model = copy.deepcopy(base.model)
        configure_long_context(model, max_length=max(LENGTHS), **switches)
        results[name] = {}
        for n in LENGTHS:
            nlls = torch.stack([token_nll(model, window, chunk=1024) for window in texts[n]]).double()
            results[name][n] = math.exp(nlls.mean().item())
            if n == max(LENGTHS):  # token i of a row is position i + 1 of its window
                by_position[name] = [math.exp(nlls[:, max(a - 1, 0):b - 1].mean().item())
                                     for a, b in zip(edges, edges[1:])]
        print(f"{name:28s} " + "  ".join(f"{n}: {results[name][n]:8.2f}" for n in LENGTHS), flush=True)
    print(f"({time.perf_counter() - started:.0f} s)")

    lines = ["| variant | " + " | ".join(f"{n} tokens" for n in LENGTHS) + f" | {max(LENGTHS)} vs {trained} |",
             "|---|" + "---|" * (len(LENGTHS) + 1)]
    for name, row in results.items():
        ratio = row[max(LENGTHS)] / row[trained]
        lines.append(f"| {name} | " + " | ".join(f"{row[n]:.2f}" for n in LENGTHS) + f" | {ratio:.2f}x |")
    lines += ["", f"Perplexity by token position inside the {max(LENGTHS)}-token windows:", "",
              "| variant | " + " | ".join(f"{a}-{b}" for a, b in zip(edges, edges[1:])) + " |",
              "|---|" + "---|" * (len(edges) - 1)]
    for name, row in by_position.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "long_context_repro.md").write_text(table + "\n", encoding="utf-8")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, row in results.items():
        ax.plot(LENGTHS, [row[n] for n in LENGTHS], marker="o", label=name)
        bx.plot([(a + b) / 2 for a, b in zip(edges, edges[1:])], by_position[name], marker="o", label=name)
    for axis in (ax, bx):
        axis.axvline(trained, color="grey", linestyle=":", label=f"trained length ({trained})")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
    ax.set_xlabel("window (tokens)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("whole windows")
    bx.set_xlabel(f"token position inside a {max(LENGTHS)}-token window")
    bx.set_title("by position")
    ax.legend(fontsize=8)
    fig.suptitle(f"tiny Qwen2 trained at {trained} tokens, evaluated longer")
    fig.tight_layout()
    fig.savefig(out / "long_context_repro.png", dpi=120)
    print(f"wrote {out / 'long_context_repro.md'} and {out / 'long_context_repro.png'}")


if __name__ == "__main__":
    main()
