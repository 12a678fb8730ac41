"""Model-based quality: perplexity scores are the same batched or one by one; the classifier learns
good from bad, and its file loads back exactly and refuses anything else."""

import dataclasses
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from qwen2.config import PRESETS
from qwen2.data.quality import PerplexityScorer, QualityClassifier
from qwen2.data.readers import DataError
from qwen2.model import Qwen2ForCausalLM


def test_batched_perplexity_equals_one_text_at_a_time(byte_tokenizer):
    model = Qwen2ForCausalLM(dataclasses.replace(PRESETS["tiny"], vocab_size=byte_tokenizer.vocab_size))
    model.init_weights(seed=0)
    model.eval()
    texts = ["a short one", "x", "a much longer text that goes on for a while, " * 3, "", "mid length text here"]
    scores = PerplexityScorer(model, byte_tokenizer, batch_size=3, max_tokens=100).score(texts)
    for text, score in zip(texts, scores):
        ids = byte_tokenizer.encode(text)[:100]
        if len(ids) < 2:
            assert math.isnan(score)
            continue
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, :-1].float()
        expected = F.cross_entropy(logits, torch.tensor(ids[1:])).item()
        assert score == pytest.approx(expected, abs=1e-4)


def _good_and_bad(n, seed):
    rng = random.Random(seed)
    subjects = ["The committee", "Our engineers", "The river", "A small village", "The old library", "Her brother"]
    verbs = ["examined", "described", "crossed", "rebuilt", "welcomed", "questioned"]
    objects = ["the proposal in detail", "the northern valley", "a new bridge", "the visiting scholars",
               "several old maps", "the results of the survey"]
    good = [" ".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(6))
            for _ in range(n)]
    spam = ["buy", "cheap", "click", "free", "$$$", "winner", "casino", "now", "!!!", "deal", "viagra", "bonus"]
    bad = [" ".join(rng.choice(spam) for _ in range(30)) for _ in range(n)]
    return good, bad


def test_the_classifier_learns_and_round_trips(tmp_path):
    good, bad = _good_and_bad(60, seed=0)
    classifier = QualityClassifier().fit(good[:40], bad[:40])
    held_good, held_bad = classifier.score(good[40:]), classifier.score(bad[40:])
    accuracy = (sum(s > 0.5 for s in held_good) + sum(s < 0.5 for s in held_bad)) / 40
    assert accuracy >= 0.95
    classifier.save(tmp_path / "q.json")
    loaded = QualityClassifier.load(tmp_path / "q.json")
    assert loaded.score(good[40:]) == pytest.approx(held_good, abs=1e-6)


@pytest.mark.parametrize("content", ["not json", json.dumps({"format": "x"}),
                                     json.dumps({"format": "qwen2-quality-classifier", "n_features": 8,
                                                 "index": [9], "weight": [1.0]})])
def test_a_bad_classifier_file_is_named(tmp_path, content):
    (tmp_path / "q.json").write_text(content)
    with pytest.raises(DataError, match="q.json"):
        QualityClassifier.load(tmp_path / "q.json")
