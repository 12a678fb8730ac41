"""The `qwen2` command: `qwen2 <verb> [options]`. Each verb is a few lines calling library functions.

Heavy imports (torch, the model) happen inside the verbs so `qwen2 --help` stays fast. Errors a
user can fix (missing model, bad config, prompt too long) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import json
import time
from pathlib import Path
from typing import Any

DEMO_PROMPT = "Write a Python function is_prime(n) that checks whether n is prime."


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="GGUF file, Hugging Face model directory, or hub id (default: the embedded demo model)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (auto: bfloat16 on CUDA or with --quantize, else the checkpoint's own dtype)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (auto: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    _add_quant_args(p, required=False)


def _add_quant_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--quantize", choices=["int8", "int4"], default=None, required=required,
                   help="weight-only quantization of the linear layers (int8 per channel, int4 per group)")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size (32, 64, 128 or 256)")
    p.add_argument("--no-quantize-lm-head", action="store_true", help="keep the LM head in float")


def _quant_config(args: argparse.Namespace) -> Any:
    if args.quantize is None:
        return None
    from qwen2.model.quant import QuantConfig

    return QuantConfig(args.quantize, group_size=args.group_size, include_lm_head=not args.no_quantize_lm_head)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: generation_config, else 0)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--system", default=None, help="system prompt (default: the chat template's)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"],
                   help="KV cache storage: the compute dtype, or int8 (about half the memory)")


def _load(args: argparse.Namespace) -> Any:
    import torch

    from qwen2.checkpoint import load_pretrained

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1 (got {args.threads})")
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device (try cpu, cuda or cuda:0)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (this PyTorch build or machine has none)")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    if dtype is None and device.type == "cuda":
        dtype = torch.bfloat16
    started = time.perf_counter()
    quant = _quant_config(args)
    pretrained = load_pretrained(args.model, dtype=dtype, device=device, quant=quant)
    weights = f", {quant.mode} weights" if quant else ""
    print(f"loaded {pretrained.source} ({pretrained.model.dtype}{weights}, {device}) in "
          f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
    return pretrained


def _sampling(args: argparse.Namespace, generation_config: dict) -> Any:
    from qwen2.inference import SamplingParams

    return SamplingParams.from_generation_config(
        generation_config, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens, seed=args.seed,
        stop=args.stop)


def _stream_reply(pretrained: Any, prompt_ids: list[int], params: Any, kv_cache_dtype: str = "auto") -> str:
    """Print a completion as it is generated, then a one-line speed summary on stderr."""
    from qwen2.inference import TextStream

    stream = TextStream(pretrained.model, pretrained.tokenizer, prompt_ids, params, stop_ids=pretrained.stop_ids,
                        kv_cache_dtype=kv_cache_dtype)
    for chunk in stream:
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")
    # The stream's own stamps: the first token is sampled right after prefill, whether or not
    # its text could be printed yet (a partial UTF-8 character or a possible stop string waits).
    n = len(stream.completion_ids)
    first = stream.first_token_at or stream.finished_at
    prefill = first - stream.started_at
    decode_time = stream.finished_at - first
    decode_rate = (n - 1) / decode_time if n > 1 and decode_time > 0 else 0.0
    print(f"[{len(prompt_ids)} prompt tokens in {prefill:.2f} s ({len(prompt_ids) / max(prefill, 1e-9):.1f} tokens/s); "
          f"{n} new tokens at {decode_rate:.1f} tokens/s; finish_reason={stream.finish_reason}]", file=sys.stderr)
    return stream.text


def _messages(system: str | None, history: list[dict[str, str]]) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system is not None else []) + history


def cmd_generate(args: argparse.Namespace) -> int:
    from qwen2.tokenizer import encode_chat

    pretrained = _load(args)
    params = _sampling(args, pretrained.generation_config)
    tokenizer = pretrained.tokenizer
    if args.raw:
        prompt_ids = tokenizer.encode(args.prompt)
    else:
        messages = _messages(args.system, [{"role": "user", "content": args.prompt}])
        prompt_ids = encode_chat(tokenizer, messages, add_generation_prompt=True)
    _stream_reply(pretrained, prompt_ids, params, args.kv_cache_dtype)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from qwen2.inference import ContextLengthError
    from qwen2.tokenizer import encode_chat

    pretrained = _load(args)
    params = _sampling(args, pretrained.generation_config)
    history: list[dict[str, str]] = []
    if not sys.stdin.isatty():  # one-shot: the whole of stdin is one user message
        text = sys.stdin.read()
        if not text.strip():
            raise ValueError("stdin is empty: nothing to answer")
        history.append({"role": "user", "content": text})
        _stream_reply(pretrained, encode_chat(pretrained.tokenizer, _messages(args.system, history),
                                              add_generation_prompt=True), params, args.kv_cache_dtype)
        return 0
    print("chat with the model; /reset clears the history, /exit or Ctrl-D leaves", file=sys.stderr)
    while True:
        try:
            text = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if text.strip() in ("/exit", "/quit"):
            return 0
        if text.strip() == "/reset":
            history.clear()
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        prompt_ids = encode_chat(pretrained.tokenizer, _messages(args.system, history), add_generation_prompt=True)
        try:
            reply = _stream_reply(pretrained, prompt_ids, params, args.kv_cache_dtype)
        except ContextLengthError as e:
            history.pop()  # keep the session: the user can /reset or ask something shorter
            print(f"error: {e}; type /reset to clear the history", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session
            history.pop()
            print("\n[interrupted]", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": reply})


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from qwen2.checkpoint import load_pretrained, save_pretrained

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    started = time.perf_counter()
    pretrained = load_pretrained(args.src, dtype=dtype)
    save_pretrained(pretrained, args.dst)
    print(f"wrote {args.dst} ({pretrained.model.dtype}) in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from qwen2.checkpoint import load_pretrained, save_pretrained
    from qwen2.model.gptq import GPTQConfig

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    started = time.perf_counter()
    # Calibrated int4 by default (round to nearest loses 15% perplexity at int4); int8 needs no calibration.
    method = args.method or ("gptq" if args.quantize == "int4" else "rtn")
    quant = dataclasses.replace(_quant_config(args), method=method,
                                int8_modules={"lm_head"} if args.int8_lm_head else frozenset())
    given = {"num_samples": args.calibration_samples, "int8_budget": args.int8_budget,
             "calibration_files": tuple(args.calibration) if args.calibration else None}
    given = {k: v for k, v in given.items() if v is not None}  # the rest: GPTQConfig's defaults
    if method == "rtn" and given:
        raise ValueError("--calibration, --calibration-samples and --int8-budget apply to --method gptq only")
    calibration = GPTQConfig(**given)
    pretrained = load_pretrained(args.src, dtype=dtype)  # float weights: GPTQ rounds the checkpoint's own values
    stored = save_pretrained(pretrained, args.dst, quant=quant, dtype=dtype or torch.bfloat16,
                             calibration=calibration, progress=True)
    print(f"wrote {args.dst} ({stored.describe()} weights) in {time.perf_counter() - started:.1f} s",
          file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from qwen2.inference.engine import Engine, EngineConfig
    from qwen2.serve import ServerConfig, create_app

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535 (got {args.port})")
    engine_config = EngineConfig(max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                                 kv_cache_tokens=args.kv_cache_tokens, kv_cache_dtype=args.kv_cache_dtype,
                                 prefill_chunk=args.prefill_chunk, prefix_caching=not args.no_prefix_caching)
    pretrained = _load(args)
    api_key = args.api_key or os.environ.get("QWEN2_API_KEY") or None
    name = args.served_model_name or (pretrained.source.rsplit("/", 1)[-1] if pretrained.source else "qwen2")
    with Engine(pretrained.model, pretrained.tokenizer, engine_config, stop_ids=pretrained.stop_ids) as engine:
        app = create_app(pretrained, engine, ServerConfig(model_name=name, api_key=api_key))
        stats = engine.stats()
        print(f"serving {name!r} on http://{args.host}:{args.port}/v1 (batch {engine_config.max_batch_size}, "
              f"KV cache {stats['kv_tokens_capacity']} tokens x {stats['kv_bytes_per_token']} bytes, "
              f"API key {'required' if api_key else 'off'})", file=sys.stderr, flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


def _long_context(args: argparse.Namespace, pretrained: Any, longest: int) -> dict:
    from qwen2.eval.long_context import configure_long_context

    sparse = None
    if args.sparse:
        sparse = {k: v for k, v in (("threshold", args.sparse_threshold), ("coverage", args.sparse_coverage))
                  if v is not None}
    settings = configure_long_context(pretrained.model, yarn=args.yarn, adaptive=args.yarn_adaptive, dca=args.dca,
                                      dca_chunk_size=args.dca_chunk_size, dca_local_size=args.dca_local_size,
                                      max_length=longest, sparse=sparse)
    mode = " + ".join(m for m, on in (("YaRN" + (" (length-adaptive)" if args.yarn_adaptive else ""), args.yarn),
                                      ("DCA", args.dca), ("sparse prefill", args.sparse)) if on) or "plain RoPE"
    print(f"long context: {mode}; trained context {settings['original_context']}", file=sys.stderr)
    return settings


def _sparse_summary(pretrained: Any) -> None:
    sparse = pretrained.model.model.sparse
    if sparse is not None:
        stats = sparse.stats
        print(f"sparse prefill: {stats.calls} sparse attention calls read {stats.density:.1%} of the (query, key) "
              f"pairs dense attention reads", file=sys.stderr)


def _lengths(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or any(v < 16 for v in values):
        raise ValueError(f"{flag}: need lengths of at least 16 tokens, got {text!r}")
    return values


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    from qwen2.eval.long_context import long_perplexity

    lengths = _lengths(args.lengths, "--lengths")
    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    pretrained = _load(args)
    _long_context(args, pretrained, max(lengths))
    ids = pretrained.tokenizer.encode(text)
    started = time.perf_counter()
    results = long_perplexity(pretrained.model, ids, lengths, windows=args.windows, chunk=args.chunk,
                              progress=sys.stderr.isatty())
    print("| length | perplexity | windows | scored tokens |\n|---|---|---|---|")
    for r in results:
        print(f"| {r.length} | {r.perplexity:.4f} | {r.windows} | {r.tokens} |")
    print(f"\nscored in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    _sparse_summary(pretrained)
    return 0


def cmd_eval_needle(args: argparse.Namespace) -> int:
    from qwen2.eval.long_context import needle_grid, needle_heatmap, needle_table

    lengths = _lengths(args.lengths, "--lengths")
    try:
        depths = [float(d) for d in args.depths.split(",")]
    except ValueError:
        raise ValueError(f"--depths takes comma-separated numbers in [0, 1], got {args.depths!r}") from None
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise ValueError(f"--depths takes numbers in [0, 1], got {args.depths!r}")
    pretrained = _load(args)
    _long_context(args, pretrained, max(lengths) + 64)
    started = time.perf_counter()

    def report(r: Any) -> None:
        print(f"  {r.prompt_tokens} tokens, depth {r.depth:g}: {'found' if r.found else 'missed'} "
              f"(answer {r.answer[:40]!r}; {time.perf_counter() - started:.0f} s so far)", file=sys.stderr, flush=True)

    results = needle_grid(pretrained.model, pretrained.tokenizer, lengths, depths, seed=args.seed, chunk=args.chunk,
                          progress=sys.stderr.isatty(), on_result=None if sys.stderr.isatty() else report)
    table = needle_table(results)
    print(table)
    found = sum(r.found for r in results)
    print(f"\nfound {found} of {len(results)} needles in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    _sparse_summary(pretrained)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "needle.md").write_text(table + "\n", encoding="utf-8")
        mode = "+".join(m for m, on in (("YaRN", args.yarn), ("DCA", args.dca), ("sparse", args.sparse)) if on) or "RoPE"
        if needle_heatmap(results, out / "needle.png", f"needle in a haystack ({mode})"):
            print(f"wrote {out / 'needle.md'} and {out / 'needle.png'}", file=sys.stderr)
        else:
            print(f"wrote {out / 'needle.md'} (no PNG: matplotlib is not installed)", file=sys.stderr)
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from qwen2.data.readers import expand_paths, iter_documents
    from qwen2.tokenizer.trainer import CONTROL_TOKENS, TrainerConfig, train_tokenizer

    started = time.perf_counter()
    files = expand_paths(args.input)  # every path checked before minutes of training
    config = TrainerConfig(vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                           control_tokens=CONTROL_TOKENS + tuple(args.extra_token or ()),
                           show_progress=sys.stderr.isatty())
    stats = {"documents": 0, "characters": 0}

    def texts():
        for document in iter_documents(files):
            stats["documents"] += 1
            stats["characters"] += len(document.text)
            yield document.text

    tokenizer = train_tokenizer(texts(), config)
    tokenizer.save(args.out)
    print(f"wrote {args.out}: {tokenizer.vocab_size} tokens ({tokenizer.vocab_size - len(config.control_tokens)} "
          f"regular + {len(config.control_tokens)} control) learned from {stats['documents']} documents "
          f"({stats['characters'] / 1e6:.1f} M characters, {len(files)} files) in "
          f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def cmd_data_pack(args: argparse.Namespace) -> int:
    from qwen2.checkpoint.loader import load_tokenizer
    from qwen2.data.readers import expand_paths, iter_documents
    from qwen2.data.shards import TokenShard, pack_documents

    started = time.perf_counter()
    files = expand_paths(args.input)
    tokenizer = load_tokenizer(Path(args.tokenizer))
    written = pack_documents(iter_documents(files), tokenizer, args.out, name=args.name,
                             val_fraction=args.val_fraction, shard_tokens=args.shard_tokens,
                             progress=sys.stderr.isatty())
    for split, sidecars in written.items():
        shards = [TokenShard.open(p) for p in sidecars]
        print(f"{split}: {sum(s.num_tokens for s in shards):,} tokens, {sum(len(s.doc_starts) for s in shards):,} "
              f"documents in {len(shards)} shard(s) under {Path(args.out) / split}", file=sys.stderr)
    print(f"packed {len(files)} files in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def cmd_data_run(args: argparse.Namespace) -> int:
    import dataclasses

    from qwen2.data.pipeline import load_pipeline_recipe, run_pipeline

    recipe = load_pipeline_recipe(args.recipe)
    changes = {k: v for k, v in (("kind", args.executor), ("workers", args.workers), ("address", args.address))
               if v is not None}
    if changes:
        if changes.get("workers", 1) < 1:
            raise ValueError(f"--workers must be at least 1 (got {changes['workers']})")
        recipe = dataclasses.replace(recipe, executor=dataclasses.replace(recipe.executor, **changes))
    out = Path(args.out) if args.out else Path("runs") / recipe.name
    started = time.perf_counter()
    summary = run_pipeline(recipe, out, progress=sys.stderr.isatty())
    seconds = time.perf_counter() - started
    dropped = ", ".join(f"{rule} {n}" for rule, n in sorted(summary.dropped.items(), key=lambda kv: -kv[1])[:6])
    print(f"{summary.documents_in:,} documents in, {summary.kept:,} passed the filters ({dropped or 'none dropped'}), "
          f"{summary.dedup['exact_removed']:,} exact and {summary.dedup['near_removed']:,} near duplicates removed, "
          f"{summary.written:,} written with {sum(summary.tokens.values()):,} tokens in {seconds:.0f} s "
          f"({recipe.executor.kind} executor, {recipe.executor.workers} workers); report: {out / 'report.md'}",
          file=sys.stderr)
    timings = json.loads((out / "timings.json").read_text(encoding="utf-8"))
    for stage, t in timings["per_worker_stage"].items():
        print(f"  {stage:16s} {t['seconds']:8.1f} s of one worker  {t['documents_per_s']:9.1f} documents/s  "
              f"{t['mb_per_s']:7.2f} MB/s", file=sys.stderr)
    return 0


def cmd_data_mixture_search(args: argparse.Namespace) -> int:
    from qwen2.data.mixture import load_mixture_recipe, run_mixture_search

    spec = load_mixture_recipe(args.recipe)
    out = Path(args.out) if args.out else Path("runs") / spec.name
    started = time.perf_counter()
    result = run_mixture_search(spec, out, progress=True)
    weights = ", ".join(f"{d} {w:.3f}" for d, w in result["weights"].items())
    print(f"{len(result['results'])} proxy models ({spec.steps} steps each) in {time.perf_counter() - started:.0f} s; "
          f"chosen mixture: {weights}; written to {out / 'mixture.json'} (a stage's mixture = that file), table in "
          f"{out / 'mixture_search.md'}", file=sys.stderr)
    return 0


def cmd_train_pretrain(args: argparse.Namespace) -> int:
    from qwen2.train.pretrain import run
    from qwen2.train.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    out = Path(args.out) if args.out else Path("runs") / recipe.name
    summary = run(recipe, out, progress=sys.stderr.isatty() or args.progress)
    if summary.val_loss is not None:
        baseline = f", unigram baseline {summary.unigram_loss:.4f}" if summary.unigram_loss is not None else ""
        print(f"validation loss {summary.val_loss:.4f} nats/token{baseline}", file=sys.stderr)
    print(f"trained {summary.steps} steps ({summary.tokens:,} tokens) in {summary.seconds:.0f} s; "
          f"model in {out / 'model'}, metrics and plots in {out}", file=sys.stderr)
    return 0


def cmd_train_finetune(args: argparse.Namespace) -> int:
    from qwen2.train.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    out = Path(args.out) if args.out else Path("runs") / recipe.name
    progress = sys.stderr.isatty() or args.progress
    if args.action == "sft":
        from qwen2.train.sft import run_sft

        result = run_sft(recipe, out, progress=progress)
        if result["eval"]:
            print(f"validation loss {result['eval']['val_loss']:.4f} on assistant tokens", file=sys.stderr)
    elif args.action == "reward":
        from qwen2.train.reward import run_reward

        result = run_reward(recipe, out, progress=progress)

        def shown(accuracy: dict | None, split: str) -> str:
            value = (accuracy or {}).get(split)
            return "-" if value is None else f"{value:.3f}"

        before, after = result["accuracy_before"], result["accuracy_after"]
        print(f"ranking accuracy: training pairs {shown(before, 'train')} before, {shown(after, 'train')} after; "
              f"held-out pairs {shown(before, 'val')} before, {shown(after, 'val')} after", file=sys.stderr)
    elif args.action == "online":
        from qwen2.train.online import run_online

        result = run_online(recipe, out, progress=progress)
        for name, scores in (("before", result["before"]), ("after", result["after"])):
            if scores:
                print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), file=sys.stderr)
    else:
        from qwen2.train.dpo import run_dpo

        result = run_dpo(recipe, out, progress=progress)
        before = result["accuracy_before"]
        print(f"preference accuracy on the training pairs: {'-' if before is None else f'{before:.3f}'} before, "
              f"{result['accuracy_after']:.3f} after", file=sys.stderr)
    print(f"trained {result['steps']} steps ({result['trainable'] / 1e6:.2f}M trainable parameters) in "
          f"{result['seconds']:.0f} s; model in {result['model']}, metrics and plots in {out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen2", description="The Qwen2 system: run, convert and (soon) train models.")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("generate", help="complete one prompt (through the chat template unless --raw)")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--raw", action="store_true", help="feed the prompt as-is, without the chat template")
    p.add_argument("prompt", nargs="?", default=DEMO_PROMPT)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat interactively (one-shot when stdin is not a terminal)")
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $QWEN2_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model id clients see (default: the file name)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"],
                   help="KV cache storage: the compute dtype, or int8 (about half the memory)")
    p.add_argument("--kv-cache-tokens", type=int, default=65536,
                   help="paged KV cache size in tokens (memory is used only by tokens in flight)")
    p.add_argument("--max-batch-size", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per forward pass")
    p.add_argument("--no-prefix-caching", action="store_true", help="do not reuse cached prompt prefixes")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("eval", help="evaluations: long-context perplexity, needle in a haystack, maths")
    esub = p.add_subparsers(dest="eval_verb", required=True)
    for name, text, func in (("ppl", "perplexity of long windows of a text file at several lengths", cmd_eval_ppl),
                             ("needle", "needle-in-a-haystack over context lengths and depths", cmd_eval_needle)):
        e = esub.add_parser(name, help=text)
        _add_model_args(e)
        e.add_argument("--yarn", type=float, default=None, metavar="FACTOR",
                       help="YaRN with this factor over the trained context (with --dca: only its temperature)")
        e.add_argument("--yarn-adaptive", action="store_true", help="YaRN scale from each sequence's length")
        e.add_argument("--dca", action="store_true", help="Dual Chunk Attention")
        e.add_argument("--dca-chunk-size", type=int, default=None, help="default: the trained context")
        e.add_argument("--dca-local-size", type=int, default=None, help="default: chunk size / 16")
        e.add_argument("--sparse", action="store_true",
                       help="sparse (vertical-and-slash) prefill of forwards reading at least --sparse-threshold keys")
        e.add_argument("--sparse-threshold", type=int, default=None, help="default 8192 keys")
        e.add_argument("--sparse-coverage", type=float, default=None,
                       help="share of each head's estimated attention its kept lines must hold (default 0.95)")
        e.add_argument("--chunk", type=int, default=2048, help="prefill chunk (tokens per forward)")
        e.set_defaults(func=func)
        if name == "ppl":
            e.add_argument("--file", required=True, help="UTF-8 text file (long documents)")
            e.add_argument("--lengths", required=True, help="comma-separated window lengths in tokens")
            e.add_argument("--windows", type=int, default=4, help="windows per length")
        else:
            e.add_argument("--lengths", default="4096", help="comma-separated prompt lengths in tokens")
            e.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="comma-separated needle depths in [0, 1]")
            e.add_argument("--seed", type=int, default=0)
            e.add_argument("--out", default=None, help="directory for needle.md and needle.png")

    from qwen2.synth.commands import add_eval_maths_parser, add_synth_parser

    add_eval_maths_parser(esub, _add_model_args, _load)
    add_synth_parser(sub, _add_model_args, _load)

    p = sub.add_parser("convert", help="convert a GGUF / HF directory / hub id into a Hugging Face directory")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (auto keeps the values exactly: float32 for a dequantized GGUF)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("quantize", help="write an int8/int4 copy of a model (loads back with --model DST)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the tensors left in float (embedding, norms, biases, scales); auto = bfloat16")
    _add_quant_args(p, required=True)
    p.add_argument("--method", choices=["gptq", "rtn"], default=None,
                   help="gptq: calibrated on text (minutes; default for int4); rtn: round to nearest (default for int8)")
    p.add_argument("--calibration", nargs="+", metavar="FILE", default=None,
                   help="GPTQ calibration text files (default: Python's standard library and reference docs)")
    p.add_argument("--calibration-samples", type=int, default=None,
                   help="GPTQ calibration sequences of 512 tokens (default 64)")
    p.add_argument("--int8-budget", type=float, default=None,
                   help="GPTQ int4: share of the decoder layers' parameters kept at int8, worst layers first "
                        "(by their measured error on the calibration text)")
    p.add_argument("--int8-lm-head", action="store_true", help="int4: keep the LM head at int8")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="action", required=True)
    p = tsub.add_parser("train", help="learn a byte-level BPE vocabulary (Qwen2's pipeline) from text / JSONL files")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help=".txt/.md files (one document each), .jsonl[.gz] ({'text': ...} per line) or directories")
    p.add_argument("--vocab-size", type=int, required=True, help="tokens in all, control tokens included")
    p.add_argument("--out", required=True, help="directory for tokenizer.json, vocab.json, merges.txt, tokenizer_config.json")
    p.add_argument("--min-frequency", type=int, default=2, help="pairs seen fewer times are never merged")
    p.add_argument("--extra-token", action="append", metavar="TOKEN",
                   help="another control token after <|endoftext|>, <|im_start|>, <|im_end|> (repeatable)")
    p.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("data", help="data tools")
    dsub = p.add_subparsers(dest="action", required=True)
    p = dsub.add_parser("pack", help="tokenize documents into token shards (train/ and val/) for pre-training")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help=".txt/.md/.jsonl[.gz] files or directories")
    p.add_argument("--tokenizer", required=True, help="a tokenizer or model directory, or a .gguf file")
    p.add_argument("--out", required=True)
    p.add_argument("--name", default="shard", help="shard file name prefix")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="share of documents (chosen by a hash of their id) written to val/")
    p.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per shard file")
    p.set_defaults(func=cmd_data_pack)
    p = dsub.add_parser("run", help="the pre-training data pipeline: filter, dedup, decontaminate, tokenize (resumes)")
    p.add_argument("--recipe", required=True, help="a TOML pipeline recipe (see recipes/data-*.toml, docs/DATA.md)")
    p.add_argument("--out", default=None, help="output directory (default: runs/<recipe name>); an existing run resumes")
    p.add_argument("--executor", choices=["local", "ray"], default=None, help="override the recipe's executor")
    p.add_argument("--workers", type=int, default=None, help="override the recipe's worker count")
    p.add_argument("--address", default=None, help="ray: the cluster to join (default: a local Ray)")
    p.set_defaults(func=cmd_data_run)
    p = dsub.add_parser("mixture-search", help="rank candidate domain mixtures by tiny proxy models' held-out loss")
    p.add_argument("--recipe", required=True, help="a TOML mixture-search recipe (see recipes/mixture-demo.toml)")
    p.add_argument("--out", default=None, help="output directory (default: runs/<recipe name>)")
    p.set_defaults(func=cmd_data_mixture_search)

    p = sub.add_parser("train", help="training stages, each driven by a TOML recipe")
    trsub = p.add_subparsers(dest="action", required=True)
    p = trsub.add_parser("pretrain", help="pre-train in stages (general -> high quality -> long context); resumes")
    p.add_argument("--recipe", required=True, help="a TOML recipe (see recipes/)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<recipe name>); an existing run resumes")
    p.add_argument("--progress", action="store_true", help="show the progress bar even when stderr is not a terminal")
    p.set_defaults(func=cmd_train_pretrain)
    for action, text in (("sft", "supervised fine-tuning on ChatML conversations (loss on assistant tokens)"),
                         ("dpo", "offline DPO on preference pairs"),
                         ("reward", "reward model (backbone + scalar head) on preference pairs, Bradley-Terry loss"),
                         ("online", "online DPO: sample k replies per prompt, score, best vs worst (optionally "
                                    "with the Online Merging Optimizer)")):
        p = trsub.add_parser(action, help=text + "; [lora] in the recipe trains adapters only; resumes")
        p.add_argument("--recipe", required=True, help="a TOML recipe (see recipes/)")
        p.add_argument("--out", default=None, help="run directory (default: runs/<recipe name>)")
        p.add_argument("--progress", action="store_true", help="show the progress bar even when stderr is not a terminal")
        p.set_defaults(func=cmd_train_finetune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from qwen2.checkpoint import CheckpointError
    from qwen2.config import ConfigError
    from qwen2.demo import DemoWeightsError
    from qwen2.synth.sandbox import SandboxError

    finished = False
    try:
        code = args.func(args)
        finished = True
        return code
    except (CheckpointError, ConfigError, DemoWeightsError, SandboxError, ValueError, OSError, FloatingPointError) as e:
        if os.environ.get("QWEN2_DEBUG"):
            raise
        print(f"qwen2 {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    finally:
        if "torch.distributed" in sys.modules:  # training under torchrun joins a process group
            from qwen2.train.distributed import shutdown

            shutdown(wait=finished)


if __name__ == "__main__":
    sys.exit(main())
