"""Quality of int8 / int4 weights on the demo model: perplexity on held-out text, greedy agreement, size.

Held-out text: the license texts Debian ships in /usr/share/common-licenses (English legal prose
used nowhere else in this project, and never used for calibration: GPTQ calibrates on Python's
standard library and reference docs, qwen2.model.gptq.default_calibration_sources). Reference:
bf16 activations with the same dequantized GGUF weights. Size: what `qwen2 quantize` writes
(quantized layers in the portable format, everything else bf16; a tied float head is not stored).
Prints a markdown table for docs/BENCHMARKS.md.
Usage: python benchmarks/bench_quant_quality.py [--windows 40] [--seq-len 512] [--calibration-samples 128]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from torch import nn

HELD_OUT = ["GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "GFDL-1.3", "Artistic"]


def stored_megabytes(model: nn.Module, quant) -> float:
    """Bytes of the safetensors file `save_hf_model(model, quant=quant, dtype=bf16)` writes, in MB."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and quant is not None and quant.applies_to(name):
            layer = quant.for_module(name)
            out, inp = module.weight.shape
            total += out * inp if layer.mode == "int8" else out * inp // 2 + 2 * 4 * out * inp // layer.group_size
            total += 4 * out if layer.mode == "int8" else 0  # int8: one float32 scale per row
            total += 2 * module.bias.numel() if module.bias is not None else 0
        elif not list(module.children()):  # a float leaf: embedding, norms, unquantized linears
            tied_head = name == "lm_head" and model.config.tie_word_embeddings
            total += 0 if tied_head else 2 * sum(p.numel() for p in module.parameters(recurse=False))
    return total / 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--int8-budget", type=float, default=0.3)
    parser.add_argument("--kv-cache", action="store_true", help="also the int8 KV cache rows")
    parser.add_argument("--group-128", action="store_true", help="also the round-to-nearest group-128 row")
    args = parser.parse_args()

    from qwen2.checkpoint import load_pretrained
    from qwen2.checkpoint.loader import calibrate
    from qwen2.eval.perplexity import greedy_agreement, perplexity
    from qwen2.model.gptq import GPTQConfig
    from qwen2.model.quant import QuantConfig, quantize_

    text = "\n\n".join(Path("/usr/share/common-licenses", name).read_text(encoding="utf-8") for name in HELD_OUT)
    results, sizes, notes = {}, {}, []
    token_ids: list[int] = []

    def evaluate(label: str, model: nn.Module, quant, kv: str | None = None) -> None:
        results[label] = perplexity(model, token_ids, seq_len=args.seq_len, max_windows=args.windows,
                                    progress=True, kv_cache_dtype=kv)
        sizes[label] = stored_megabytes(model_float, quant)
        print(f"{label}: ppl {results[label].perplexity:.4f}, {sizes[label]:.0f} MB", flush=True)

    # Round to nearest (and the float reference), quantized while loading.
    rtn_runs = [("bf16 (reference)", None), ("int8 (per channel, round to nearest)", QuantConfig("int8")),
                ("int4, group 32 (round to nearest)", QuantConfig("int4", group_size=32))]
    if args.group_128:
        rtn_runs.append(("int4, group 128 (round to nearest)", QuantConfig("int4", group_size=128)))
    float32 = load_pretrained(None, dtype=torch.float32)
    model_float = float32.model
    token_ids = float32.tokenizer.encode(text)

    def evaluate_rtn(runs: list) -> None:
        for label, quant in runs:
            evaluate(label, load_pretrained(None, dtype=torch.bfloat16, quant=quant).model, quant)

    evaluate_rtn(rtn_runs[:1])  # the reference first; the calibrated rows next (they take longest)

    # GPTQ: one calibration (group 32, the LM head at int8, an int8 budget for the decoder layers);
    # the all-int4 decoder is its result plus the int4 versions of the layers the budget replaced.
    quant = QuantConfig("int4", group_size=32, method="gptq", int8_modules={"lm_head"})
    calibration = GPTQConfig(num_samples=args.calibration_samples, int8_budget=args.int8_budget)
    result = calibrate(float32, quant, calibration, progress=True)
    mixed = result.config.int8_modules - {"lm_head"}
    notes.append(f"GPTQ calibration: {result.seconds:.0f} s ({args.calibration_samples} x {calibration.seq_len} "
                 f"tokens); the {args.int8_budget:.0%} int8 budget kept {len(mixed)} linears at int8: {sorted(mixed)}")
    print(notes[-1], flush=True)
    variants = [("int4, group 32, GPTQ, int8 LM head", quant, result.tensors | result.replaced_int4),
                (f"int4, group 32, GPTQ, int8 LM head, worst decoder layers int8 ({args.int8_budget:.0%} budget)",
                 result.config, result.tensors)]
    for label, config, tensors in variants:
        model = quantize_(copy.deepcopy(model_float).to(torch.bfloat16), config, tensors)
        evaluate(label, model, config)
        del model

    evaluate_rtn(rtn_runs[1:])
    if args.kv_cache:
        bf16 = load_pretrained(None, dtype=torch.bfloat16).model
        for label, kv in [("bf16 weights, bf16 KV cache (chunks of 64 through the cache)", "auto"),
                          ("bf16 weights, int8 KV cache (chunks of 64 through the cache)", "int8")]:
            evaluate(label, bf16, None, kv)

    reference = results["bf16 (reference)"]
    print(f"\nHeld-out text: {len(text) / 1e3:.0f} kB of license texts, {reference.num_tokens} tokens scored in "
          f"{args.windows} windows of {args.seq_len}.\n")
    print("| weights | perplexity | vs bf16 | greedy agreement with bf16 | size (MB) |")
    print("|---|---|---|---|---|")
    order = [label for label, _ in rtn_runs] + [label for label in results if label not in dict(rtn_runs)]
    for label in order:
        r = results[label]
        print(f"| {label} | {r.perplexity:.4f} | {100 * (r.perplexity / reference.perplexity - 1):+.2f}% "
              f"| {100 * greedy_agreement(r, reference):.1f}% | {sizes[label]:.0f} |")
    print()
    for note in notes:
        print(note)


if __name__ == "__main__":
    started = time.perf_counter()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main()
    print(f"total {time.perf_counter() - started:.0f} s")
