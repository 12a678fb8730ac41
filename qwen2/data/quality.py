"""Model-based quality scores, as the Qwen2 report filters with Qwen models:

- `PerplexityScorer`: the mean negative log-likelihood (nats per token) of a document's first
  `max_tokens` tokens under a Qwen2 model (the demo model or any model directory), batched through
  our own model. Fluent text scores low; word salad, garbled or machine-broken text scores high.
- `QualityClassifier`: a light linear classifier (hashed word 1-2-gram features, logistic
  regression; scikit-learn) trained from labelled good / bad examples, scoring P(good). Saved as a
  JSON file of its settings and coefficients, never pickled.

Thresholds are per domain and language in the pipeline's recipe (qwen2.data.pipeline).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from qwen2.data.readers import DataError


class PerplexityScorer:
    def __init__(self, model: Any, tokenizer: Any, *, max_tokens: int = 512, batch_size: int = 8,
                 head_rows: int = 256) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_tokens, self.batch_size, self.head_rows = max_tokens, batch_size, head_rows

    @torch.inference_mode()
    def score(self, texts: list[str]) -> list[float]:
        """Mean NLL in nats per token for each text (nan for a text of fewer than 2 tokens).
        Texts of similar length are batched together (right padding, masked)."""
        ids = [self.tokenizer.encode(t)[:self.max_tokens] for t in texts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        scores = [math.nan] * len(ids)
        pad = 0
        for a in range(0, len(order), self.batch_size):
            rows = [i for i in order[a:a + self.batch_size] if len(ids[i]) >= 2]
            if not rows:
                continue
            T = max(len(ids[i]) for i in rows)
            batch = torch.full((len(rows), T), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), T), dtype=torch.long)
            for r, i in enumerate(rows):
                batch[r, :len(ids[i])] = torch.tensor(ids[i])
                mask[r, :len(ids[i])] = 1
            device = self.model.device
            h_BTD = self.model.model(batch.to(device), attention_mask_BS=mask.to(device))
            for r, i in enumerate(rows):
                n = len(ids[i])
                targets = batch[r, 1:n].to(device)
                total = 0.0
                for s in range(0, n - 1, self.head_rows):  # the LM head a slice of rows at a time
                    logits = self.model.lm_head(h_BTD[r, s:min(s + self.head_rows, n - 1)]).float()
                    total += F.cross_entropy(logits, targets[s:s + self.head_rows], reduction="sum").item()
                scores[i] = total / (n - 1)
        return scores


@dataclass
class QualityClassifier:
    """P(good) from hashed word unigrams and bigrams (lower-cased), logistic regression."""

    n_features: int = 2 ** 18
    coef: np.ndarray | None = None  # (n_features,)
    intercept: float = 0.0

    def _features(self, texts: list[str]):
        from sklearn.feature_extraction.text import HashingVectorizer

        return HashingVectorizer(n_features=self.n_features, ngram_range=(1, 2), alternate_sign=False,
                                 norm="l2", lowercase=True).transform(texts)

    def fit(self, good: list[str], bad: list[str], *, c: float = 4.0) -> QualityClassifier:
        from sklearn.linear_model import LogisticRegression

        if not good or not bad:
            raise ValueError("the quality classifier needs both good and bad examples")
        model = LogisticRegression(C=c, max_iter=1000, solver="liblinear")
        model.fit(self._features(good + bad), [1] * len(good) + [0] * len(bad))
        self.coef, self.intercept = model.coef_[0].astype(np.float32), float(model.intercept_[0])
        return self

    def score(self, texts: list[str]) -> list[float]:
        if self.coef is None:
            raise ValueError("the quality classifier is not trained (fit or load it first)")
        logits = self._features(texts) @ self.coef + self.intercept
        return (1 / (1 + np.exp(-np.asarray(logits, dtype=np.float64)))).tolist()

    def save(self, path: str | Path) -> None:
        from qwen2.atomic import atomic_write_text

        nonzero = np.flatnonzero(self.coef)
        atomic_write_text(path, json.dumps({"format": "qwen2-quality-classifier", "n_features": self.n_features,
                                            "intercept": self.intercept, "index": nonzero.tolist(),
                                            "weight": self.coef[nonzero].tolist()}))

    @classmethod
    def load(cls, path: str | Path) -> QualityClassifier:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not a quality classifier file ({e})") from None
        if not isinstance(data, dict) or data.get("format") != "qwen2-quality-classifier":
            raise DataError(f"{path}: not a quality classifier file (format field missing)")
        n = data.get("n_features")
        index, weight = data.get("index"), data.get("weight")
        if (not isinstance(n, int) or not 0 < n <= 2 ** 24 or not isinstance(index, list) or not isinstance(weight, list)
                or len(index) != len(weight) or any(not isinstance(i, int) or not 0 <= i < n for i in index)):
            raise DataError(f"{path}: malformed quality classifier (n_features, index, weight)")
        coef = np.zeros(n, dtype=np.float32)
        coef[np.asarray(index, dtype=np.int64)] = np.asarray(weight, dtype=np.float32)
        return cls(n_features=n, coef=coef, intercept=float(data.get("intercept", 0.0)))
