"""Deduplication: exact (a hash of the normalised text) and near-duplicate (MinHash signatures,
locality-sensitive hashing over bands, union-find into clusters).

Near-dup works across any number of shards in two steps, so a cluster spanning shards is found
and the result does not depend on how documents were split or in which order shards finished:
1. per shard, `signatures()` of every document (datasketch's MinHash; saved as .npy, never
   pickled, with the parameters that made them);
2. once, over all signatures: `near_duplicate_clusters()` puts two documents in one cluster when
   some band of `rows` signature values is identical in both (the LSH candidate test) and, with
   `verify`, their estimated Jaccard similarity (the share of equal signature values) reaches the
   threshold. Each cluster keeps its smallest key (document order is shard, then position) and
   drops the rest.

Shingles are word n-grams of the text lower-cased with everything but letters and digits folded to
spaces, so punctuation, case and spacing differences do not hide a copy.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


@dataclass(frozen=True)
class DedupConfig:
    exact: bool = True
    near: bool = True
    ngram: int = 5            # words per shingle
    num_perm: int = 128       # signature length
    threshold: float = 0.8    # Jaccard similarity that makes a near-duplicate
    bands: int | None = None  # LSH bands x rows <= num_perm; default: datasketch's optimum for the threshold
    rows: int | None = None
    seed: int = 1
    verify: bool = True       # candidates must also reach the threshold by signature agreement

    def __post_init__(self) -> None:
        if self.ngram < 1 or self.num_perm < 2:
            raise ValueError("dedup: ngram must be >= 1 and num_perm >= 2")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"dedup: threshold must be in (0, 1] (got {self.threshold})")
        if (self.bands is None) != (self.rows is None):
            raise ValueError("dedup: give both bands and rows, or neither")
        if self.bands is not None and (self.bands < 1 or self.rows < 1 or self.bands * self.rows > self.num_perm):
            raise ValueError(f"dedup: need bands x rows <= num_perm ({self.bands} x {self.rows} > {self.num_perm})")

    def banding(self) -> tuple[int, int]:
        if self.bands is not None:
            return self.bands, self.rows
        from datasketch.lsh import _optimal_param

        return _optimal_param(self.threshold, self.num_perm, 0.5, 0.5)


def canonical(text: str) -> str:
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def exact_key(text: str) -> str:
    """Equal for texts that differ only in case, punctuation and spacing."""
    return hashlib.sha256(canonical(text).encode()).hexdigest()


def shingles(text: str, n: int) -> list[bytes]:
    words = canonical(text).split()
    if len(words) < n:
        return [" ".join(words).encode()] if words else []
    return [" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)]


def signatures(texts: list[str], config: DedupConfig) -> np.ndarray:
    """(documents, num_perm) MinHash signatures; a document without words gets all-max values
    (it then matches only other empty documents)."""
    from datasketch import MinHash

    out = np.empty((len(texts), config.num_perm), dtype=np.uint64)
    for i, text in enumerate(texts):
        minhash = MinHash(num_perm=config.num_perm, seed=config.seed)
        minhash.update_batch(sorted(set(shingles(text, config.ngram))))
        out[i] = minhash.hashvalues
    return out


def near_duplicate_clusters(signatures_ND: np.ndarray, config: DedupConfig) -> list[list[int]]:
    """Clusters (sorted lists of row indices, each of two or more rows) of near-duplicates, sorted
    by their first row. Row order is document order: keep each cluster's first row."""
    N = signatures_ND.shape[0]
    bands, rows = config.banding()
    parent = list(range(N))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for band in range(bands):
        block = np.ascontiguousarray(signatures_ND[:, band * rows:(band + 1) * rows])
        first_with: dict[bytes, int] = {}
        for i in range(N):
            key = block[i].tobytes()
            j = first_with.setdefault(key, i)
            if j == i:
                continue
            if config.verify and float((signatures_ND[i] == signatures_ND[j]).mean()) < config.threshold:
                continue
            a, b = root(i), root(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    clusters: dict[int, list[int]] = {}
    for i in range(N):
        clusters.setdefault(root(i), []).append(i)
    return sorted((members for members in clusters.values() if len(members) > 1), key=lambda m: m[0])


def jaccard(a: str, b: str, n: int) -> float:
    """Exact Jaccard similarity of two texts' shingle sets (for tests and reports)."""
    x, y = set(shingles(a, n)), set(shingles(b, n))
    return len(x & y) / len(x | y) if x | y else 1.0
