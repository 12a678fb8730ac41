"""Token shards: packing documents, the files' layout, the validation split, and damaged shards."""

import json

import numpy as np
import pytest

from qwen2.cli import main
from qwen2.data.readers import DataError, Document
from qwen2.data.shards import TokenShard, find_shards, pack_documents

END = 256  # <|endoftext|> in the byte tokenizer


def docs(n=40):
    return [Document(id=f"doc{i // 2}", text=f"document {i}: " + "x" * (i % 7), source="s" + str(i % 2))
            for i in range(n)]


def test_pack_writes_each_document_then_end_of_text(tmp_path, byte_tokenizer):
    written = pack_documents(docs(), byte_tokenizer, tmp_path, shard_tokens=200)
    assert set(written) == {"train"} and len(written["train"]) > 1  # rolled over at 200 tokens
    shards = [TokenShard.open(p, fingerprint=byte_tokenizer.fingerprint) for p in written["train"]]
    texts = []
    for shard in shards:
        assert shard.num_tokens <= 200 and shard.meta["eos_id"] == END
        bounds = list(shard.doc_starts) + [shard.num_tokens]
        for a, b in zip(bounds, bounds[1:]):
            assert shard.tokens[b - 1] == END
            texts.append(byte_tokenizer.decode(shard.tokens[a:b - 1].tolist()))
    assert texts == [d.text for d in docs()]  # in order, nothing lost
    assert sum(sum(s.meta["sources"].values()) for s in shards) == 40


def test_validation_split_keeps_documents_with_one_id_together(tmp_path, byte_tokenizer):
    written = pack_documents(docs(400), byte_tokenizer, tmp_path, val_fraction=0.2)
    splits = {}
    for split, sidecars in written.items():
        for shard in (TokenShard.open(p) for p in sidecars):
            bounds = list(shard.doc_starts) + [shard.num_tokens]
            for a, b in zip(bounds, bounds[1:]):
                text = byte_tokenizer.decode(shard.tokens[a:b - 1].tolist())
                splits.setdefault(int(text.split(":")[0].split()[1]) // 2, set()).add(split)
    assert all(len(s) == 1 for s in splits.values())  # both documents of an id on one side
    share = sum("val" in s for s in splits.values()) / len(splits)
    assert 0.1 < share < 0.3, share


def test_damaged_or_foreign_shards_are_named(tmp_path, byte_tokenizer):
    sidecar = pack_documents(docs(), byte_tokenizer, tmp_path)["train"][0]
    with pytest.raises(DataError, match="different tokenizer"):
        TokenShard.open(sidecar, fingerprint="0" * 64)
    bin_path = sidecar.with_suffix(".bin")
    data = bin_path.read_bytes()
    bin_path.write_bytes(data[:-4])
    with pytest.raises(DataError, match=r"shard-00000\.bin: expected \d+ bytes .* found \d+"):
        TokenShard.open(sidecar)
    bin_path.write_bytes(data[:-4] + np.array([10 ** 6], "<u4").tobytes())
    with pytest.raises(DataError, match="outside the vocabulary"):
        TokenShard.open(sidecar)
    sidecar.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="not a readable shard sidecar"):
        TokenShard.open(sidecar)
    with pytest.raises(DataError, match="no token shards"):
        find_shards(tmp_path / "nothing")


def test_cli_pack(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": str(i), "text": f"text number {i}"}) for i in range(50)),
                      encoding="utf-8")
    tok_dir = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "--out", str(tok_dir)]) == 0
    assert main(["data", "pack", "--input", str(corpus), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "s"),
                 "--val-fraction", "0.1"]) == 0
    err = capsys.readouterr().err
    assert "train: " in err and "val: " in err and " documents in 1 shard(s)" in err
    assert len(find_shards(tmp_path / "s" / "train")) == 1
