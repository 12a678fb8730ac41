"""The mixture loader: packed windows, document ids, mixture weights, rank slices, exact resume."""

import numpy as np
import pytest

from qwen2.data.readers import DataError, Document
from qwen2.data.shards import TokenShard, pack_documents
from qwen2.train.data import MixtureLoader, validation_batches

END = 256


@pytest.fixture(scope="module")
def sources(byte_tokenizer, tmp_path_factory):
    out = {}
    for name, letter in (("a", "a"), ("b", "b")):
        docs = [Document(id=f"{name}{i}", text=f"{letter * (3 + i % 11)} {i}") for i in range(200)]
        root = tmp_path_factory.mktemp(name)
        written = pack_documents(docs, byte_tokenizer, root, shard_tokens=500)  # several shards each
        out[name] = [TokenShard.open(p) for p in written["train"]]
    return out


def test_windows_are_the_stream_with_shifted_labels_and_document_ids(sources):
    loader = MixtureLoader({"a": sources["a"]}, seed=0)
    stream = np.concatenate([np.asarray(s.tokens) for s in sources["a"]]).astype(np.int64)
    first, second = (loader.next_batch(2, 16, {"a": 1.0}) for _ in range(2))
    rows = [*first.input_ids_BT, *second.input_ids_BT]
    for i, row in enumerate(rows):  # consecutive windows of 16, across shard boundaries
        assert row.tolist() == stream[16 * i:16 * i + 16].tolist()
    assert first.labels_BT[0, :-1].tolist() == first.input_ids_BT[0, 1:].tolist()
    assert first.labels_BT[0, -1] == first.input_ids_BT[1, 0]
    ids, docs = first.input_ids_BT[0].tolist(), first.document_ids_BT[0].tolist()
    for t in range(1, 16):  # a new document starts right after each end-of-text token
        assert (docs[t] != docs[t - 1]) == (ids[t - 1] == END)


def test_mixture_weights_and_rank_slices(sources):
    loader = MixtureLoader(sources, seed=1)
    only_a = loader.next_batch(8, 8, {"a": 1.0, "b": 0.0})
    assert only_a.sources == ["a"] * 8
    mixed = [MixtureLoader(sources, seed=2).next_batch(64, 8, {"a": 0.25, "b": 0.75}) for _ in range(1)][0]
    assert 0.6 < mixed.sources.count("b") / 64 < 0.9
    whole = MixtureLoader(sources, seed=3).next_batch(6, 8, {"a": 1, "b": 1})
    halves = [MixtureLoader(sources, seed=3).next_batch(6, 8, {"a": 1, "b": 1}, rank=r, world_size=2) for r in (0, 1)]
    assert halves[0].input_ids_BT.tolist() == whole.input_ids_BT[0::2].tolist()
    assert halves[1].input_ids_BT.tolist() == whole.input_ids_BT[1::2].tolist()
    with pytest.raises(DataError, match="unknown sources"):
        loader.next_batch(2, 8, {"c": 1.0})
    with pytest.raises(DataError, match="no source a positive weight"):
        loader.next_batch(2, 8, {"a": 0.0})


def test_state_dict_resumes_the_exact_sequence(sources):
    loader = MixtureLoader(sources, seed=4)
    for _ in range(30):  # long enough to wrap a source (a new epoch)
        loader.next_batch(4, 64, {"a": 1, "b": 1})
    state = loader.state_dict()
    expected = [loader.next_batch(4, 64, {"a": 1, "b": 1}).input_ids_BT for _ in range(5)]
    resumed = MixtureLoader(sources, seed=999)
    resumed.load_state_dict(state)
    assert all((resumed.next_batch(4, 64, {"a": 1, "b": 1}).input_ids_BT == e).all() for e in expected)
    assert any(s.epoch > 0 for s in resumed.streams.values())
    with pytest.raises(DataError, match="data sources"):
        MixtureLoader({"a": sources["a"]}, seed=0).load_state_dict(state)


def test_validation_batches_are_fixed_and_sequences_must_fit(sources):
    first = validation_batches(sources["b"], batch_size=3, seq_len=10, max_batches=2)
    again = validation_batches(sources["b"], batch_size=3, seq_len=10, max_batches=2)
    assert len(first) == 2 and all((x.input_ids_BT == y.input_ids_BT).all() for x, y in zip(first, again))
    with pytest.raises(DataError, match="fewer than one sequence"):
        MixtureLoader({"a": sources["a"][:1]}, seed=0).next_batch(1, 10_000, {"a": 1})
