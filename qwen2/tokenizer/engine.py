"""BPE engines: text that is already NFC and free of added tokens -> regular token ids.

Two interchangeable engines produce the ids of HF's Qwen2 pipeline (Split regex -> byte-level -> BPE):

* `TiktokenEngine` (fast, ~6x HF). tiktoken merges the adjacent pair whose *concatenation* has the
  lowest rank, whereas HF BPE applies the listed *merges* in order. The two agree exactly when the
  merges are "tiktoken-derived" (see `merges_match_ranks`), which is true of Qwen2's vocabulary.
* `TokenizersEngine` (the `tokenizers` library, i.e. HF's own code) for any vocabulary that fails
  that check, and for the rare text tiktoken's regex engine cannot handle (see `_has_long_space_run`).

`build_engine` is the one place that chooses.
"""

from __future__ import annotations

import threading
from typing import Protocol

import tiktoken
import tokenizers
from tokenizers import pre_tokenizers

from qwen2.tokenizer.vocab import PRETOKENIZE_REGEX, Vocabulary


class Engine(Protocol):
    name: str

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, which must already be NFC-normalised; added-token strings are plain text here."""
        ...


class TokenizersEngine:
    """HF `tokenizers` BPE with the Qwen2 pre-tokenizer and no normaliser or added tokens (we do those)."""

    name = "tokenizers"

    def __init__(self, vocab: Vocabulary) -> None:
        model = tokenizers.models.BPE(
            vocab={token: i for i, token in enumerate(vocab.tokens)},
            merges=list(vocab.merges),
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
        self._tokenizer = tokenizers.Tokenizer(model)
        self._tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(tokenizers.Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids


# tiktoken's regex engine (fancy-regex) keeps one backtracking entry per character of a whitespace run
# for `\s+(?!\S)`, and panics (pyo3 PanicException, not even an Exception) once a single run reaches
# ~1M characters (measured: 900k spaces ok, 1M fail; mixed whitespace runs of 131k fuzzed ok).
# Text with a run far below that limit is routed to the tokenizers engine, which handles 1M spaces
# in <1 s and gives the same ids.
LONG_SPACE_RUN = 65_536


def _has_long_space_run(text: str, limit: int = LONG_SPACE_RUN) -> bool:
    """True only if `text` has a whitespace run longer than `limit`, and always if one of >= 2*limit.

    Scanning every character with a regex would cost ~25% of encode time, so sample every `limit`-th
    character: a run of 2*limit chars contains a whole aligned window [k*limit, (k+1)*limit], whose
    two sampled ends are then both whitespace, and `str.isspace` confirms the window in C.
    (`isspace` is a superset of the regex's `\\s`, so nothing is missed.)
    """
    if len(text) < limit:
        return False
    samples = text[::limit]
    for k in range(len(samples) - 1):
        if samples[k].isspace() and samples[k + 1].isspace():
            if text[k * limit : (k + 1) * limit + 1].isspace():
                return True
    return False


class TiktokenEngine:
    """tiktoken with Qwen2's ranks (rank = token id); valid only if `merges_match_ranks` holds."""

    name = "tiktoken"

    def __init__(self, vocab: Vocabulary, token_bytes: list[bytes]) -> None:
        self._vocab = vocab
        self._encoding = tiktoken.Encoding(
            name="qwen2",
            pat_str=PRETOKENIZE_REGEX,
            mergeable_ranks={raw: i for i, raw in enumerate(token_bytes)},
            special_tokens={},
        )
        self._fallback: TokenizersEngine | None = None
        self._lock = threading.Lock()

    def _slow_path(self) -> TokenizersEngine:
        # Built on first use only (~0.3 s): almost no real text has a 64k-char whitespace run.
        with self._lock:
            if self._fallback is None:
                self._fallback = TokenizersEngine(self._vocab)
            return self._fallback

    def encode(self, text: str) -> list[int]:
        if _has_long_space_run(text):
            return self._slow_path().encode(text)
        return self._encoding.encode_ordinary(text)


def _restricted_bpe_splits_as(token: bytes, rank: int, left_len: int, ranks: dict[bytes, int]) -> bool:
    """Does tiktoken's BPE on `token`, using only ranks below `rank`, end in exactly [left, right]?"""
    parts = [token[i : i + 1] for i in range(len(token))]
    ends = list(range(1, len(token) + 1))  # end offset of each part, to spot a merge across left|right
    pair_ranks = [ranks.get(parts[i] + parts[i + 1], rank) for i in range(len(parts) - 1)]
    while len(parts) > 2:
        best_rank = min(pair_ranks)
        if best_rank >= rank:
            return False  # stuck with 3+ parts: tiktoken could never build this token from (left, right)
        best = pair_ranks.index(best_rank)  # leftmost on ties, as tiktoken
        if ends[best] == left_len:
            return False  # merges across the canonical boundary: (left, right) is never formed
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
        del ends[best], pair_ranks[best]
        if best > 0:
            pair_ranks[best - 1] = ranks.get(parts[best - 1] + parts[best], rank)
        if best < len(parts) - 1:
            pair_ranks[best] = ranks.get(parts[best] + parts[best + 1], rank)
    return ends[0] == left_len


def merges_match_ranks(token_bytes: list[bytes], merges: list[tuple[str, str]], tokens: list[str]) -> bool:
    """True if tiktoken (rank = id) and HF BPE (ordered merges) give identical ids on every input.

    `token_bytes[i]` are the raw bytes of regular token i, `tokens[i]` its byte-level string.
    Sufficient conditions, all checked here:
    1. all 256 single bytes are tokens (tiktoken needs them; byte-level input can contain any byte);
    2. every multi-byte token is the result of exactly one merge, and merge order equals result-id
       order, so both engines prefer the same pair whenever both consider it;
    3. for each merge (a, b) -> t of rank r, tiktoken's BPE on t restricted to ranks < r ends in exactly
       [a, b] (the merges are what HF's tiktoken converter derives from ranks). Then, inside any
       longer text, the parts covering t evolve as in that restricted run, so tiktoken can only ever
       build t from (a, b) -- never from another split it would find in the vocab -- and both engines
       make the same choice at every step.
    Qwen2/2.5 pass; the check costs ~0.8 s in pure Python for 151k merges (once per load).
    """
    ranks = {b: i for i, b in enumerate(token_bytes)}
    if len(ranks) != len(token_bytes):
        return False  # two tokens with the same bytes: tiktoken cannot represent that
    if any(bytes([b]) not in ranks for b in range(256)):
        return False
    if sum(1 for b in token_bytes if len(b) > 1) != len(merges):
        return False
    ids = {token: i for i, token in enumerate(tokens)}
    previous = -1
    for left, right in merges:
        a, b = token_bytes[ids[left]], token_bytes[ids[right]]
        rank = ranks[a + b]
        if rank <= previous:
            return False
        previous = rank
        if len(a) + len(b) > 2 and not _restricted_bpe_splits_as(a + b, rank, len(a), ranks):
            return False
    return True


def build_engine(vocab: Vocabulary, token_bytes: list[bytes]) -> Engine:
    """tiktoken when it provably matches HF for this vocabulary, else the tokenizers library.

    `token_bytes[i]` are the raw bytes of regular token i (`vocab.token_to_bytes(vocab.tokens[i])`).
    """
    if merges_match_ranks(token_bytes, vocab.merges, vocab.tokens):
        return TiktokenEngine(vocab, token_bytes)
    return TokenizersEngine(vocab)
