"""Quality of int8 / int4 weights on the demo model: perplexity on held-out text and greedy agreement.

Held-out text: the license texts Debian ships in /usr/share/common-licenses (English legal prose
used nowhere else in this project). Reference: bf16 activations with the same dequantized GGUF
weights. Prints a markdown table for docs/BENCHMARKS.md.
Usage: python benchmarks/bench_quant_quality.py [--windows 40] [--seq-len 512]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

HELD_OUT = ["GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "GFDL-1.3", "Artistic"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()

    from qwen2.checkpoint import load_pretrained
    from qwen2.eval.perplexity import greedy_agreement, perplexity
    from qwen2.model.quant import QuantConfig

    text = "\n\n".join(Path("/usr/share/common-licenses", name).read_text(encoding="utf-8") for name in HELD_OUT)
    runs = [("bf16 (reference)", None), ("int8 weights", QuantConfig("int8")),
            ("int4 weights, group 32", QuantConfig("int4", group_size=32)),
            ("int4 weights, group 128", QuantConfig("int4", group_size=128)),
            ("bf16 weights, bf16 KV cache (chunks of 64 through the cache)", "cache-auto"),
            ("bf16 weights, int8 KV cache (chunks of 64 through the cache)", "cache-int8")]
    results = {}
    token_ids = None
    for label, quant in runs:
        kv = quant.removeprefix("cache-") if isinstance(quant, str) else None
        pretrained = load_pretrained(None, dtype=torch.bfloat16, quant=None if kv else quant)
        token_ids = token_ids or pretrained.tokenizer.encode(text)
        results[label] = perplexity(pretrained.model, token_ids, seq_len=args.seq_len, max_windows=args.windows,
                                    progress=True, kv_cache_dtype=kv)
        print(f"{label}: ppl {results[label].perplexity:.4f}", flush=True)
        del pretrained
    reference = results[runs[0][0]]
    print(f"\nHeld-out text: {len(text) / 1e3:.0f} kB of license texts, {reference.num_tokens} tokens scored in "
          f"{args.windows} windows of {args.seq_len}.\n")
    print("| weights | perplexity | vs bf16 | greedy agreement with bf16 |")
    print("|---|---|---|---|")
    for label, _ in runs:
        r = results[label]
        print(f"| {label} | {r.perplexity:.4f} | {100 * (r.perplexity / reference.perplexity - 1):+.2f}% "
              f"| {100 * greedy_agreement(r, reference):.1f}% |")


if __name__ == "__main__":
    main()
