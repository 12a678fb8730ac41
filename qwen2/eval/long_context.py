"""Long-context evaluation: perplexity over long windows and needle-in-a-haystack, with YaRN and / or
Dual Chunk Attention switched on for a loaded model.

Both feed a sequence through a KV cache in prefill chunks (`chunk` tokens at a time), so memory
follows the chunk, not the length: no (length x vocabulary) logits and, with DCA, no (length x
length) attention. Losses come from the LM head a chunk of rows at a time, so quantized heads work.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from qwen2.model import KVCache, Qwen2ForCausalLM


def configure_long_context(model: Qwen2ForCausalLM, *, yarn: float | None = None, adaptive: bool = False,
                           dca: bool = False, dca_chunk_size: int | None = None, dca_local_size: int | None = None,
                           max_length: int | None = None, sparse: dict[str, Any] | None = None) -> dict[str, Any]:
    """Switch a loaded model to YaRN (static, or `adaptive` to the length) and / or DCA, from its
    trained context (`max_position_embeddings`, or an existing rope_scaling's original). With DCA,
    YaRN contributes its attention temperature (qwen2.model.dca). `sparse`: sparse prefill with these
    settings (qwen2.model.sparse.SparseConfig fields; {} = the defaults). Returns the settings applied."""
    config = model.config
    original = int((config.rope_scaling or {}).get("original_max_position_embeddings")
                   or config.max_position_embeddings)
    if yarn is not None and yarn < 1:
        raise ValueError(f"--yarn factor must be >= 1 (got {yarn})")
    rope_scaling = config.rope_scaling
    dca_config = None
    longest = max(original, int(original * (yarn or 1)), max_length or 0)
    if dca:
        chunk = dca_chunk_size or original
        dca_config = {"chunk_size": chunk, "local_size": dca_local_size if dca_local_size is not None else chunk // 16,
                      "original_max_position_embeddings": original if yarn else 0}
        rope_scaling = None  # plain RoPE under DCA
    elif yarn is not None:
        rope_scaling = {"rope_type": "yarn", "factor": float(yarn), "original_max_position_embeddings": original}
        if adaptive:
            rope_scaling["length_adaptive"] = True
    new = dataclasses.replace(config, rope_scaling=rope_scaling, dual_chunk_attention_config=dca_config,
                              max_position_embeddings=longest, sparse_prefill_config=sparse)
    model.config = model.model.config = new
    model.model.set_rope(new)
    return {"original_context": original, "rope_scaling": rope_scaling, "dual_chunk_attention_config": dca_config,
            "max_position_embeddings": longest, "sparse_prefill_config": sparse}


@torch.inference_mode()
def token_nll(model: Qwen2ForCausalLM, ids: torch.Tensor, *, chunk: int = 2048,
              head_rows: int = 256) -> torch.Tensor:
    """Negative log-likelihood of every token after the first (float32, length len(ids) - 1) of one
    sequence of token ids, fed through a KV cache `chunk` tokens at a time and scored `head_rows`
    rows at a time, so neither a T x T matrix nor T x vocabulary logits ever exist."""
    T = len(ids)
    cache = KVCache.allocate(model.config, batch_size=1, max_seq_len=T, dtype=model.dtype, device=model.device)
    out = torch.empty(max(T - 1, 0), dtype=torch.float32)
    for start in range(0, T, chunk):
        piece = ids[start:start + chunk].to(model.device)
        h_TD = model.model(piece[None], kv_cache=cache)[0]
        targets = ids[start + 1:start + 1 + len(piece)].to(model.device)
        h_TD = h_TD[:len(targets)]  # the last token of the sequence predicts nothing
        for r in range(0, len(targets), head_rows):
            logits = model.lm_head(h_TD[r:r + head_rows]).float()
            nll = F.cross_entropy(logits, targets[r:r + head_rows], reduction="none")
            out[start + r:start + r + len(nll)] = nll.cpu()
    return out


def sequence_nll(model: Qwen2ForCausalLM, ids: torch.Tensor, *, chunk: int = 2048,
                 head_rows: int = 256) -> tuple[float, int]:
    """(summed negative log-likelihood, scored tokens) of one sequence of token ids (see token_nll)."""
    nll = token_nll(model, ids, chunk=chunk, head_rows=head_rows)
    return nll.double().sum().item(), len(nll)


@dataclass
class LengthResult:
    length: int
    perplexity: float
    windows: int
    tokens: int


def long_perplexity(model: Qwen2ForCausalLM, token_ids: list[int], lengths: Iterable[int], *,
                    windows: int = 4, chunk: int = 2048, progress: bool = False) -> list[LengthResult]:
    """Perplexity at each length over up to `windows` non-overlapping windows of that many tokens
    (every token of a window scored, with its whole window before it as context)."""
    ids = torch.tensor(token_ids, dtype=torch.long)
    results = []
    for length in lengths:
        pieces = [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)][:windows]
        if not pieces:
            raise ValueError(f"the text has {len(ids)} tokens: not one window of {length}")
        nll, count = 0.0, 0
        for piece in tqdm(pieces, desc=f"ppl @ {length}", disable=not progress):
            total, n = sequence_nll(model, piece, chunk=chunk)
            nll, count = nll + total, count + n
        results.append(LengthResult(length, math.exp(nll / count), len(pieces), count))
    return results


# --- needle in a haystack -----------------------------------------------------------------------

NEEDLE = "The special magic number mentioned in this document is {secret}."
QUESTION = "What is the special magic number mentioned in the document? Answer with the number only."


def haystack_text() -> str:
    """Long English prose every Python ships: the reference documentation's topics (pydoc_data)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


@dataclass
class NeedleResult:
    length: int  # the prompt length asked for
    prompt_tokens: int  # the prompt's real length (re-encoding the cut filler may move it by a token)
    depth: float  # where the needle sits, 0 = start of the haystack, 1 = end
    secret: str
    answer: str
    found: bool


@torch.inference_mode()
def needle_trial(model: Qwen2ForCausalLM, tokenizer: Any, filler_ids: list[int], length: int, depth: float,
                 secret: str, *, chunk: int = 2048, max_new_tokens: int = 12) -> NeedleResult:
    """One needle: a chat prompt of `length` tokens whose document is filler text with the needle
    sentence at `depth`; greedy answer; found if the secret number is in it."""
    from qwen2.tokenizer import encode_chat

    needle_ids = tokenizer.encode(" " + NEEDLE.format(secret=secret) + " ")
    empty = encode_chat(tokenizer, [{"role": "user", "content": "Document:\n\n" + "\n\n" + QUESTION}],
                        add_generation_prompt=True)
    room = length - len(empty) - len(needle_ids)
    if room <= 0 or room > len(filler_ids):
        raise ValueError(f"a needle prompt of {length} tokens needs {room} filler tokens; "
                         f"the filler has {len(filler_ids)}")
    filler = filler_ids[:room]
    at = int(round(depth * room))
    document = tokenizer.decode(filler[:at] + needle_ids + filler[at:])
    ids = encode_chat(tokenizer, [{"role": "user", "content": "Document:\n" + document + "\n\n" + QUESTION}],
                      add_generation_prompt=True)
    prompt = torch.tensor(ids)
    cache = KVCache.allocate(model.config, batch_size=1, max_seq_len=len(ids) + max_new_tokens, dtype=model.dtype,
                             device=model.device)
    for start in range(0, len(ids) - 1, chunk):  # prefill all but the last token in chunks
        model(prompt[None, start:min(start + chunk, len(ids) - 1)].to(model.device), kv_cache=cache, logits_to_keep=1)
    token = prompt[-1:]
    answer_ids: list[int] = []
    stops = set(getattr(tokenizer, "stop_ids", ()) or ())
    for _ in range(max_new_tokens):
        logits = model(token[None].to(model.device), kv_cache=cache)[0, -1]
        next_id = int(logits.argmax())
        if next_id in stops:
            break
        answer_ids.append(next_id)
        token = torch.tensor([next_id])
    answer = tokenizer.decode(answer_ids).strip()
    return NeedleResult(length, len(ids), depth, secret, answer, secret in answer)


def needle_grid(model: Qwen2ForCausalLM, tokenizer: Any, lengths: list[int], depths: list[float], *,
                seed: int = 0, chunk: int = 2048, progress: bool = False,
                on_result: Callable[[NeedleResult], None] | None = None) -> list[NeedleResult]:
    """One needle per (length, depth); `on_result` sees each result as it comes (a long grid takes hours)."""
    filler_ids = tokenizer.encode(haystack_text())
    rng = random.Random(seed)
    trials = [(length, depth) for length in lengths for depth in depths]
    results = []
    for length, depth in tqdm(trials, desc="needle", disable=not progress):
        secret = str(rng.randrange(1_000_000, 10_000_000))  # 7 digits: not guessable, a few tokens
        results.append(needle_trial(model, tokenizer, filler_ids, length, depth, secret, chunk=chunk))
        if on_result is not None:
            on_result(results[-1])
    return results


def needle_table(results: list[NeedleResult]) -> str:
    depths = sorted({r.depth for r in results})
    lengths = sorted({r.length for r in results})
    lines = ["| prompt tokens | " + " | ".join(f"depth {d:g}" for d in depths) + " |",
             "|---|" + "---|" * len(depths)]
    for length in lengths:
        cells = {r.depth: ("found" if r.found else f"missed ({r.answer[:20]!r})") for r in results if r.length == length}
        lines.append(f"| {length} | " + " | ".join(cells.get(d, "") for d in depths) + " |")
    return "\n".join(lines)


def needle_heatmap(results: list[NeedleResult], path: str | Path, title: str) -> bool:
    """A found / missed grid (rows: lengths, columns: depths) as a PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    depths = sorted({r.depth for r in results})
    lengths = sorted({r.length for r in results})
    grid = [[next((float(r.found) for r in results if r.length == n and r.depth == d), float("nan")) for d in depths]
            for n in lengths]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(depths), 1.0 + 0.6 * len(lengths)))
    ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("prompt tokens")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
