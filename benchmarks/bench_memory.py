"""Peak memory (VmHWM) of one process that loads the demo model, prefills 512 tokens and decodes 128:
qwen2 (int4 / int8 weights, bf16 activations) vs llama.cpp on the GGUF as shipped.

Each case runs in a fresh subprocess so peaks do not mix; the number includes everything the
process touched (Python, torch, tokenizer, weights, KV cache, activations; for llama.cpp the
file-backed pages of the mapped GGUF).
Usage: python benchmarks/bench_memory.py [--cases int4 int8 llama.cpp]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

QWEN2 = """
import torch
from qwen2.checkpoint import load_pretrained
from qwen2.inference import SamplingParams, generate_ids
from qwen2.model.quant import QuantConfig
pre = load_pretrained(None, dtype=torch.bfloat16, quant=QuantConfig({mode!r}))
text = open(torch.__file__.replace("__init__.py", "functional.py")).read()
ids = pre.tokenizer.encode(text)[:512]
for _ in generate_ids(pre.model, [ids], SamplingParams(max_new_tokens=128)):
    pass
"""

LLAMA = """
import llama_cpp
from qwen2.demo import demo_gguf_path
llm = llama_cpp.Llama(str(demo_gguf_path()), n_ctx=1024, n_batch=512, n_threads=2, verbose=False)
text = open(__import__("torch").__file__.replace("__init__.py", "functional.py")).read()
ids = llm.tokenize(text.encode())[:512]
llm.eval(ids)
for _ in range(128):
    llm.eval([llm.sample(temp=0.0)])
"""

REPORT = """
for line in open("/proc/self/status"):
    if line.startswith(("VmHWM", "VmRSS")):
        print(line.strip())
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="+", default=["int4", "int8", "llama.cpp"])
    args = parser.parse_args()
    rows = []
    for case in args.cases:
        code = (LLAMA if case == "llama.cpp" else QWEN2.format(mode=case)) + REPORT
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if result.returncode != 0:
            print(f"{case}: failed\n{result.stderr[-2000:]}")
            continue
        values = dict(line.split(":") for line in result.stdout.splitlines() if line.startswith("Vm"))
        peak, rest = (int(values[k].split()[0]) / 1024 for k in ("VmHWM", "VmRSS"))
        rows.append((case, peak, rest))
        print(f"{case}: peak {peak:.0f} MiB, at the end {rest:.0f} MiB", flush=True)
    print("\n| process | peak RSS (MiB) | RSS at the end (MiB) |")
    print("|---|---|---|")
    for case, peak, rest in rows:
        label = f"qwen2, {case} weights" if case != "llama.cpp" else "llama.cpp (llama-cpp-python), GGUF as shipped"
        print(f"| {label} | {peak:.0f} | {rest:.0f} |")


if __name__ == "__main__":
    main()
