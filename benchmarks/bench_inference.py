"""Prefill and decode speed of the demo model: qwen2 vs transformers, same weights, same precision, one run.

Both load the same GGUF (dequantized to float32), then each precision is measured on both
implementations back to back, medians of --repeats runs. Prints a markdown table for
docs/BENCHMARKS.md. Usage: python benchmarks/bench_inference.py [--repeats 3] [--dtypes float32 bfloat16]
"""

from __future__ import annotations

import argparse
import copy
import gc
import platform
import statistics
import time

import torch


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def bench_llama_cpp(path, long_ids: list[int], prompt: list[int], n_new: int, repeats: int):
    """(prefill tok/s, greedy decode tok/s) of llama.cpp on the same GGUF, 2 threads; None if not installed."""
    try:
        import llama_cpp
        import numpy as np
    except ImportError:
        print("llama-cpp-python not installed: no llama.cpp row (pip install llama-cpp-python)")
        return None
    threads = torch.get_num_threads()
    llm = llama_cpp.Llama(str(path), n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads,
                          verbose=False, logits_all=False)
    vocab = llama_cpp.llama_n_vocab(llama_cpp.llama_model_get_vocab(llm.model)) if hasattr(
        llama_cpp, "llama_model_get_vocab") else llm.n_vocab()

    def prefill():
        llm.reset()
        llm.eval(long_ids)

    def decode():
        llm.reset()
        llm.eval(prompt)
        for _ in range(n_new):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
            llm.eval([int(logits.argmax())])

    prefill(), decode()
    p = len(long_ids) / statistics.median([timed(prefill) for _ in range(repeats)])
    d = n_new / statistics.median([timed(decode) for _ in range(repeats)])
    print(f"llama.cpp prefill {p:8.1f} tokens/s, decode {d:8.1f} tokens/s", flush=True)
    return p, d


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--quantized", nargs="*", default=["int8", "int4"])
    args = parser.parse_args()

    import transformers

    from qwen2.checkpoint import load_pretrained
    from qwen2.demo import demo_gguf_path
    from qwen2.inference import SamplingParams, generate_ids
    from qwen2.tokenizer import encode_chat

    path = demo_gguf_path()
    load_ours = timed(lambda: globals().__setitem__("_ours", load_pretrained(path, dtype=torch.float32)))
    ours_fp32 = globals().pop("_ours")
    load_hf = timed(lambda: globals().__setitem__("_hf", transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()))
    hf_fp32 = globals().pop("_hf")
    tokenizer = ours_fp32.tokenizer
    prompt = encode_chat(tokenizer, [{"role": "user", "content": "Write a quicksort in Python."}],
                         add_generation_prompt=True)
    long_ids = torch.randint(1000, 100000, (1, args.prefill_tokens), generator=torch.Generator().manual_seed(0))
    n_new = args.decode_tokens

    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        # Module.to() converts in place: convert copies so the float32 originals stay exact.
        ours = copy.deepcopy(ours_fp32.model).to(dtype) if dtype != torch.float32 else ours_fp32.model
        hf = copy.deepcopy(hf_fp32).to(dtype) if dtype != torch.float32 else hf_fp32

        def ours_prefill():
            with torch.inference_mode():
                ours(long_ids, logits_to_keep=1)

        def hf_prefill():
            with torch.inference_mode():
                hf(long_ids, logits_to_keep=1, use_cache=False)

        def ours_decode():
            for _ in generate_ids(ours, [prompt], SamplingParams(max_new_tokens=n_new)):
                pass

        def hf_decode():
            with torch.inference_mode():
                hf.generate(torch.tensor([prompt]), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)

        results = {}
        for label, fn in [("qwen2 prefill", ours_prefill), ("transformers prefill", hf_prefill),
                          ("qwen2 decode", ours_decode), ("transformers decode", hf_decode)]:
            fn()  # warm-up
            times = [timed(fn) for _ in range(args.repeats)]
            count = args.prefill_tokens if "prefill" in label else n_new
            results[label] = count / statistics.median(times)
            print(f"{dtype_name:9s} {label:22s} {results[label]:8.1f} tokens/s", flush=True)
        rows.append((dtype_name, results))
        del ours, hf
        gc.collect()

    # Weight-only int8 / int4 (bf16 activations): qwen2 only; transformers has no CPU int4 path of its own.
    from qwen2.model.quant import QuantConfig

    quant_rows = []
    for mode in args.quantized:
        quantized = load_pretrained(path, quant=QuantConfig(mode)).model

        def q_prefill():
            with torch.inference_mode():
                quantized(long_ids, logits_to_keep=1)

        def q_decode():
            for _ in generate_ids(quantized, [prompt], SamplingParams(max_new_tokens=n_new)):
                pass

        q_prefill(), q_decode()
        prefill = args.prefill_tokens / statistics.median([timed(q_prefill) for _ in range(args.repeats)])
        decode = n_new / statistics.median([timed(q_decode) for _ in range(args.repeats)])
        print(f"{mode:9s} qwen2 prefill {prefill:8.1f} tokens/s, decode {decode:8.1f} tokens/s", flush=True)
        quant_rows.append((mode, prefill, decode))
        del quantized
        gc.collect()

    llama_row = bench_llama_cpp(path, long_ids[0].tolist(), prompt, n_new, args.repeats)

    print(f"\nMachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}. "
          f"Load: qwen2 {load_ours:.1f} s, transformers {load_hf:.1f} s. Medians of {args.repeats}.\n")
    print(f"| dtype | prefill {args.prefill_tokens} tok: qwen2 | transformers | ratio "
          f"| decode {n_new} tok (batch 1): qwen2 | transformers | ratio |")
    print("|---|---|---|---|---|---|---|")
    for dtype_name, r in rows:
        p_ours, p_hf = r["qwen2 prefill"], r["transformers prefill"]
        d_ours, d_hf = r["qwen2 decode"], r["transformers decode"]
        print(f"| {dtype_name} | {p_ours:.1f} | {p_hf:.1f} | {p_ours / p_hf:.2f}x "
              f"| {d_ours:.1f} | {d_hf:.1f} | {d_ours / d_hf:.2f}x |")
    for mode, prefill, decode in quant_rows:
        print(f"| {mode} weights, bf16 activations | {prefill:.1f} | — | — | {decode:.1f} | — | — |")
    if llama_row:
        print(f"| llama.cpp, GGUF as shipped (Q5_0/Q8_0/Q4_K/Q6_K) | {llama_row[0]:.1f} | — | — "
              f"| {llama_row[1]:.1f} | — | — |")


if __name__ == "__main__":
    main()
