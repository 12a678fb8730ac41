"""The demo model as a quality filter: real prose scores better (lower NLL) than the same words
shuffled and than machine-garbled copies of it."""

import random

from qwen2.data.quality import PerplexityScorer

PARAGRAPHS = [
    "The printing press spread quickly across Europe in the second half of the fifteenth century. Within a few "
    "decades, books that had once been copied by hand were produced by the thousand, and their price fell sharply.",
    "To install the package, create a virtual environment, activate it, and run pip install with the name of the "
    "project. The command downloads the dependencies and places a script on your path.",
    "Photosynthesis converts light energy into chemical energy. Plants take in carbon dioxide and water and, using "
    "sunlight, produce glucose and release oxygen as a by-product.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
]


def _shuffled(text, rng):
    words = text.split()
    rng.shuffle(words)
    return " ".join(words)


def _garbled(text, rng):
    # what broken OCR or a bad encoding pass leaves: dropped and swapped characters, stray symbols
    out = []
    for c in text:
        r = rng.random()
        if r < 0.08:
            continue
        out.append(rng.choice("#%&@~^") if r < 0.14 else c)
    return "".join(out)


def test_real_text_scores_better_than_shuffled_and_garbled_copies(demo):
    rng = random.Random(0)
    scorer = PerplexityScorer(demo.model, demo.tokenizer, batch_size=4)
    originals = scorer.score(PARAGRAPHS)
    shuffled = scorer.score([_shuffled(p, rng) for p in PARAGRAPHS])
    garbled = scorer.score([_garbled(p, rng) for p in PARAGRAPHS])
    for o, s, g in zip(originals, shuffled, garbled):
        assert o < s and o < g, (originals, shuffled, garbled)
