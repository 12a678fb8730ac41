"""Encode throughput, one thread: qwen2.tokenizer vs Hugging Face on the same Qwen2.5 vocabulary.

Corpus: Python stdlib sources plus translated UI strings from /usr/share/locale (zh, ja, ko, ru, ar,
...), ~10 MB of UTF-8, one document per file/catalog. Each tokenizer encodes every document one at a
time; the median of 3 runs is reported as MB/s of UTF-8 input, followed by a markdown table row.
The ids of the two are compared on the whole corpus as a by-product.

    python benchmarks/bench_tokenizer.py                 # tokenizer from the demo GGUF
    python benchmarks/bench_tokenizer.py --dir PATH      # a HF tokenizer directory
"""

from __future__ import annotations

import argparse
import gettext
import os
import statistics
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# One thread for HF too: tokenizers would otherwise use a rayon pool for batches.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from qwen2.tokenizer import Tokenizer, tokenizer_json_from_gguf  # noqa: E402

LANGUAGES = ["zh_CN", "ja", "ko", "ru", "ar", "th", "hi", "de", "fr", "es", "vi", "uk", "el", "he"]


def load_corpus(target_bytes: int) -> list[str]:
    """Half Python source, half locale strings, up to about `target_bytes` of UTF-8."""
    docs: list[str] = []
    size = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if size >= target_bytes // 2:
            break
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.append(text)
        size += len(text.encode("utf-8", errors="replace"))
    per_language = (target_bytes - size) // len(LANGUAGES)
    for lang in LANGUAGES:
        got = 0
        for path in sorted(Path("/usr/share/locale", lang, "LC_MESSAGES").glob("*.mo")):
            if got >= per_language:
                break
            try:
                with path.open("rb") as f:
                    catalog = gettext.GNUTranslations(f)._catalog
            except (OSError, UnicodeDecodeError, ValueError):
                continue
            text = "\n".join(v for k, v in catalog.items() if k and isinstance(v, str))
            docs.append(text)
            got += len(text.encode("utf-8"))
        size += got
    return docs


def load_ours(directory: str | None) -> Tokenizer:
    if directory:
        return Tokenizer.from_dir(directory)
    from qwen2.checkpoint.gguf import GGUFFile
    from qwen2.demo import demo_gguf_path

    fields = GGUFFile(demo_gguf_path()).tokenizer_fields()
    obj, config = tokenizer_json_from_gguf(
        fields["tokens"], fields["token_types"], fields["merges"], bos_id=fields["bos_id"],
        eos_id=fields["eos_id"], pad_id=fields["pad_id"], chat_template=fields["chat_template"],
    )
    return Tokenizer.from_tokenizer_json(obj, config)


def throughput(
    encode: Callable[[str], list[int]], docs: list[str], megabytes: float, runs: int = 3
) -> tuple[float, list[list[int]]]:
    """Median MB/s over `runs` passes, and the ids of the last pass."""
    rates = []
    ids: list[list[int]] = []
    for _ in range(runs):
        start = time.perf_counter()
        ids = [encode(doc) for doc in docs]
        rates.append(megabytes / (time.perf_counter() - start))
    return statistics.median(rates), ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="HF tokenizer directory (default: the demo GGUF's tokenizer)")
    parser.add_argument("--megabytes", type=float, default=10.0, help="corpus size (default 10)")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    ours = load_ours(args.dir)
    with tempfile.TemporaryDirectory() as tmp:
        ours.save(tmp)  # the identical tokenizer.json, loaded by transformers' own code
        hf = AutoTokenizer.from_pretrained(tmp)
    docs = load_corpus(int(args.megabytes * 1e6))
    megabytes = sum(len(d.encode("utf-8", errors="replace")) for d in docs) / 1e6

    backend = hf.backend_tokenizer
    ours_rate, ours_ids = throughput(ours.encode, docs, megabytes)
    raw_rate, raw_ids = throughput(lambda d: backend.encode(d, add_special_tokens=False).ids, docs, megabytes)
    hf_rate, _ = throughput(lambda d: hf.encode(d, add_special_tokens=False), docs, megabytes)

    print(f"corpus: {len(docs)} documents, {megabytes:.1f} MB UTF-8; engine: {ours.engine_name}; "
          f"ids identical: {'yes' if ours_ids == raw_ids else 'NO'}")
    print("| corpus | qwen2.tokenizer | tokenizers (HF backend) | transformers | speedup vs transformers |")
    print("|---|---|---|---|---|")
    print(f"| {megabytes:.1f} MB code+i18n | {ours_rate:.2f} MB/s | {raw_rate:.2f} MB/s | {hf_rate:.2f} MB/s "
          f"| {ours_rate / hf_rate:.1f}x |")


if __name__ == "__main__":
    main()
