"""Continuous batching: total decode throughput and memory for 1..16 concurrent streams.

The engine runs in-process on the demo model (int4 weights by default, bf16 activations). Each
stream decodes a fixed number of tokens (stop ids disabled, so every stream runs to the end);
throughput counts decode steps only (after every prompt is in the cache). Memory: the process's
resident set and the KV bytes the engine holds at the peak, per extra stream.
Usage: python benchmarks/bench_batching.py [--quantize int4] [--streams 1,2,4,8,16] [--tokens 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quantize", default="int4", choices=["int4", "int8", "none"])
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"])
    parser.add_argument("--streams", default="1,2,4,8,16")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from qwen2.checkpoint import load_pretrained
    from qwen2.inference import SamplingParams
    from qwen2.inference.engine import Engine, EngineConfig
    from qwen2.model.quant import QuantConfig

    quant = None if args.quantize == "none" else QuantConfig(args.quantize)
    pretrained = load_pretrained(None, dtype=torch.bfloat16, quant=quant)
    tokenizer = pretrained.tokenizer
    text = open(torch.__file__.replace("__init__.py", "functional.py"), encoding="utf-8").read()
    ids = tokenizer.encode(text)
    params = SamplingParams(max_new_tokens=args.tokens)
    counts = [int(n) for n in args.streams.split(",")]
    print(f"threads {torch.get_num_threads()}, weights {args.quantize}, KV {args.kv_cache_dtype}, "
          f"{args.prompt_tokens}-token prompts, {args.tokens} new tokens per stream")
    rows = []
    for n in counts:
        rates, peaks, kv_peaks = [], [], []
        for repeat in range(args.repeats):
            engine = Engine(pretrained.model, tokenizer,
                            EngineConfig(max_batch_size=max(counts), prefix_caching=False,
                                         kv_cache_dtype=args.kv_cache_dtype),
                            stop_ids=frozenset())  # no early stops: every stream decodes --tokens
            before = rss_mib()
            offset = 997 * repeat
            handles = [engine.submit(ids[offset + i * 50: offset + i * 50 + args.prompt_tokens], params)
                       for i in range(n)]
            while any(not r.prefilled for r in engine._running) or engine._waiting:
                engine.step()
            generated_before = sum(r.num_generated for r in engine._running)
            start = time.perf_counter()
            kv_peak = 0
            while engine._running:
                kv_peak = max(kv_peak, engine.stats()["kv_bytes_in_use"])
                engine.step()
            elapsed = time.perf_counter() - start
            total = sum(h.result()[2].completion_tokens for h in handles) - generated_before
            rates.append(total / elapsed)
            peaks.append(rss_mib() - before)
            kv_peaks.append(kv_peak / 2**20)
            del engine
        rows.append((n, statistics.median(rates), statistics.median(kv_peaks), statistics.median(peaks)))
        print(f"{n:>2} streams: {rows[-1][1]:.1f} tokens/s total, KV {rows[-1][2]:.1f} MiB", flush=True)
    single = rows[0][1]
    print("\n| streams | decode tokens/s (total) | per stream | vs 1 stream | KV cache at peak (MiB) |")
    print("|---|---|---|---|---|")
    for n, rate, kv, _ in rows:
        print(f"| {n} | {rate:.1f} | {rate / n:.1f} | {rate / single:.2f}x | {kv:.1f} |")


if __name__ == "__main__":
    main()
