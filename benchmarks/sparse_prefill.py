"""Sparse (vertical-and-slash) prefill against dense prefill on the demo model, in one run: time and
perplexity of one long window of text at each length, the share of (query, key) pairs sparse
attention read, and needles found with sparse prefill at the same lengths.

Usage: python benchmarks/sparse_prefill.py [--lengths 16384,32768] [--depths 0.25,0.5,0.75]
           [--threshold 8192] [--coverage 0.95] [--weights int4|bf16] [--yarn F] [--dca]
           [--out docs/sparse_prefill.md]
With --dca (and --yarn for its temperature) both sides run Dual Chunk Attention, past the trained
context: sparse DCA against dense DCA.
The text is the Python documentation's topics (pydoc_data, shipped with Python): long, real prose
and code the model has not been asked about.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="default: the embedded demo model (int4)")
    parser.add_argument("--lengths", default="16384,32768")
    parser.add_argument("--depths", default="0.25,0.5,0.75")
    parser.add_argument("--threshold", type=int, default=8192)
    parser.add_argument("--coverage", type=float, default=0.95)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights", choices=["int4", "bf16"], default="int4",
                        help="int4 (round-to-nearest) or the GGUF's own weights in bfloat16")
    parser.add_argument("--yarn", type=float, default=None, help="YaRN factor (with --dca: its temperature)")
    parser.add_argument("--dca", action="store_true", help="Dual Chunk Attention on both sides")
    parser.add_argument("--dca-chunk-size", type=int, default=None, help="default: the trained context")
    parser.add_argument("--out", default=None, help="markdown file for the tables")
    args = parser.parse_args()

    from qwen2.checkpoint import load_pretrained
    from qwen2.eval.long_context import configure_long_context, haystack_text, needle_grid, sequence_nll
    from qwen2.model.quant import QuantConfig

    torch.set_num_threads(args.threads)
    lengths = [int(n) for n in args.lengths.split(",")]
    depths = [float(d) for d in args.depths.split(",") if d]
    if args.weights == "int4":
        pretrained = load_pretrained(args.model, quant=QuantConfig("int4"))  # None: the demo model
    else:
        pretrained = load_pretrained(args.model, dtype=torch.bfloat16)
    long_context = {"yarn": args.yarn, "dca": args.dca, "dca_chunk_size": args.dca_chunk_size}
    model, tokenizer = pretrained.model, pretrained.tokenizer
    ids = torch.tensor(tokenizer.encode(haystack_text()))
    sparse_settings = {"threshold": args.threshold, "coverage": args.coverage}
    rows, needles = [], []
    for n in lengths:
        if len(ids) < n:
            raise SystemExit(f"the text has only {len(ids)} tokens, fewer than {n}")
        window = ids[:n]
        measured = {}
        for name, sparse in (("dense", None), ("sparse", sparse_settings)):
            configure_long_context(model, max_length=n, sparse=sparse, **long_context)
            started = time.perf_counter()
            total, count = sequence_nll(model, window, chunk=args.chunk)
            seconds = time.perf_counter() - started
            density = model.model.sparse.stats.density if sparse is not None else 1.0
            measured[name] = (seconds, float(torch.tensor(total / count).exp()), density)
            print(f"{n} tokens, {name}: {seconds:.1f} s, perplexity {measured[name][1]:.4f}, "
                  f"{density:.1%} of the pairs", flush=True)
        (td, pd, _), (ts, ps, density) = measured["dense"], measured["sparse"]
        rows.append(f"| {n} | {td:.1f} | {ts:.1f} | **{td / ts:.2f}x** | {pd:.4f} | {ps:.4f} | "
                    f"{(ps / pd - 1) * 100:+.2f}% | {density:.1%} |")
        configure_long_context(model, max_length=n + 64, sparse=sparse_settings, **long_context)
        started = time.perf_counter()
        for r in needle_grid(model, tokenizer, [n], depths, chunk=args.chunk):
            needles.append(f"| {r.prompt_tokens} | {r.depth:g} | {'found' if r.found else 'missed'} | "
                           f"{r.answer[:40]!r} |")
            print(needles[-1], flush=True)
        print(f"needles at {n}: {time.perf_counter() - started:.0f} s", flush=True)

    table = ("| tokens | dense s | sparse s | speed-up | dense ppl | sparse ppl | ppl change | pairs read |\n"
             "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
             "| prompt tokens | depth | sparse prefill | answer |\n|---|---|---|---|\n" + "\n".join(needles) + "\n")
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
