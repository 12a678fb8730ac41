"""Load test of `qwen2 serve` (loopback only, bounded): N requests at concurrency C via the openai client.

Starts the server on a free 127.0.0.1 port with the demo model (int4 weights by default), warms it
up, answers each distinct prompt once sequentially (the reference outputs and single-stream
latency), then sends --requests streaming chat requests from --concurrency threads. Reports errors,
lost requests, throughput, latency and time-to-first-token percentiles, how many greedy outputs
equal the sequential ones, and the server's resident memory before, right after and once idle.
Usage: python benchmarks/bench_serve.py [--requests 200] [--concurrency 16] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

QUESTIONS = [
    "Write a Python function is_prime(n).", "What is 17 * 23?", "Explain recursion in two sentences.",
    "Write hello world in C.", "What does HTTP status 404 mean?", "Reverse a string in JavaScript.",
    "What is the capital of France?", "Write a SQL query that counts rows in a table named users.",
    "Explain what a hash map is.", "Write a bash loop that prints 1 to 5.", "What is 2 to the power of 10?",
    "Name three sorting algorithms.", "Write a Python list comprehension for the squares of 0..9.",
    "What is the difference between a list and a tuple in Python?", "Write a regex that matches an email.",
    "What is Big-O of binary search?", "Write a function that returns the maximum of a list in Go.",
    "What does git rebase do?", "Convert 100 degrees Celsius to Fahrenheit.", "What is a closure?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--quantize", default="int4", choices=["int4", "int8", "none"])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    import openai

    port = free_port()
    cmd = [sys.executable, "-m", "qwen2", "serve", "--port", str(port), "--served-model-name", "demo",
           "--log-level", "warning", "--max-batch-size", str(args.concurrency)]
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--quantize", args.quantize] if args.quantize != "none" else []
    server = subprocess.Popen(cmd)
    try:
        deadline = time.time() + 600
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit("the server did not start")
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)

        def ask(question: str) -> dict:
            started = time.perf_counter()
            first = None
            text, usage = [], None
            for chunk in client.chat.completions.create(
                    model="demo", messages=[{"role": "user", "content": question}], temperature=0,
                    max_tokens=args.max_tokens, stream=True, stream_options={"include_usage": True}):
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                    text.append(chunk.choices[0].delta.content)
                if chunk.usage:
                    usage = chunk.usage
            done = time.perf_counter()
            return {"text": "".join(text), "latency": done - started, "ttft": (first or done) - started,
                    "tokens": usage.completion_tokens if usage else 0}

        for q in QUESTIONS[:2]:
            ask(q)  # warm-up
        baseline = rss_mib(server.pid)
        sequential = {}
        seq_started = time.perf_counter()
        for q in QUESTIONS:
            sequential[q] = ask(q)
        seq_time = time.perf_counter() - seq_started
        seq_tokens = sum(r["tokens"] for r in sequential.values())
        print(f"sequential: {len(QUESTIONS)} requests, {seq_tokens / seq_time:.1f} output tokens/s, "
              f"latency p50 {statistics.median(r['latency'] for r in sequential.values()):.2f} s", flush=True)

        work = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.requests)]
        results, errors = [], []
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            futures = {pool.submit(ask, q): q for q in work}
            for future in concurrent.futures.as_completed(futures):
                try:
                    results.append((futures[future], future.result()))
                except Exception as e:  # counted, not hidden
                    errors.append(f"{type(e).__name__}: {e}")
        wall = time.perf_counter() - started
        after = rss_mib(server.pid)
        time.sleep(3)
        idle = rss_mib(server.pid)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as r:
            health = r.read().decode()
        tokens = sum(r["tokens"] for _, r in results)
        same = sum(r["text"] == sequential[q]["text"] for q, r in results)
        latencies = [r["latency"] for _, r in results]
        ttfts = [r["ttft"] for _, r in results]
        print(f"\nhealth after the run: {health}\n")
        print(f"| {args.requests} requests at concurrency {args.concurrency}, {args.quantize} weights, "
              f"max_tokens {args.max_tokens} | value |")
        print("|---|---|")
        print(f"| errors | {len(errors)} |")
        print(f"| lost (no answer) | {args.requests - len(results) - len(errors)} |")
        print(f"| wall time | {wall:.1f} s |")
        print(f"| throughput | {len(results) / wall:.2f} requests/s, {tokens / wall:.1f} output tokens/s "
              f"({tokens / wall / (seq_tokens / seq_time):.2f}x sequential) |")
        print(f"| latency p50 / p95 | {statistics.median(latencies):.2f} s / {pct(latencies, 0.95):.2f} s |")
        print(f"| time to first token p50 / p95 | {statistics.median(ttfts):.2f} s / {pct(ttfts, 0.95):.2f} s |")
        print(f"| greedy outputs equal to the sequential run | {same} / {len(results)} |")
        print(f"| server RSS: before / right after / idle 3 s later | {baseline:.0f} / {after:.0f} / {idle:.0f} MiB |")
        if errors:
            print("\nerrors:", *errors[:5], sep="\n  ")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
