"""Documents from .txt / .jsonl / .jsonl.gz files and directories; bad input named by file and line."""

import gzip
import json

import pytest

from qwen2.data.readers import DataError, Document, iter_documents
from qwen2.data.writers import DocumentWriter, RejectWriter


def test_text_jsonl_gzip_and_directories(tmp_path):
    (tmp_path / "a.txt").write_text("first document\nwith two lines", encoding="utf-8")
    rows = [{"text": "二つ目", "id": "x", "lang": "ja", "meta": {"k": 1}}, {"text": "third", "domain": "code"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "fourth"}) + "\n")
    (tmp_path / "ignored.bin").write_bytes(b"\x00")
    docs = list(iter_documents([tmp_path]))
    assert [d.text for d in docs] == ["first document\nwith two lines", "二つ目", "third", "fourth"]
    assert (docs[1].id, docs[1].lang, docs[1].meta) == ("x", "ja", {"k": 1})
    assert docs[2].domain == "code" and docs[2].id.endswith("b.jsonl:2")  # no id: where it came from


@pytest.mark.parametrize("content,message", [
    (b'{"text": "ok"}\n{"text": "broken\n', r"b\.jsonl:2: not valid JSON"),
    (b'{"text": "ok"}\n{"text": "\xff"}\n', r"b\.jsonl:2: invalid UTF-8"),
    (b'[1, 2]\n', r"b\.jsonl:1: expected a JSON object, got list"),
    (b'{"txt": "typo"}\n', r"b\.jsonl:1: field 'text' must be a string, got NoneType"),
    (b'{"text": "x", "meta": 3}\n', r"b\.jsonl:1: field 'meta' must be an object"),
])
def test_bad_jsonl_lines_are_named(tmp_path, content, message):
    (tmp_path / "b.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=message):
        list(iter_documents([tmp_path / "b.jsonl"]))


def test_bad_paths_are_named(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
    with pytest.raises(DataError, match=r"bad\.txt: invalid UTF-8 at byte 3"):
        list(iter_documents([tmp_path / "bad.txt"]))
    with pytest.raises(DataError, match="no such file"):
        list(iter_documents([tmp_path / "missing.jsonl"]))
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(DataError, match="unknown file type"):
        list(iter_documents([tmp_path / "x.bin"]))
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"x\.parquet: not a readable Parquet file"):
        list(iter_documents([tmp_path / "x.parquet"]))
    (tmp_path / "t.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:40])
    with pytest.raises(DataError, match=r"t\.jsonl\.gz: cannot decompress"):
        list(iter_documents([tmp_path / "t.jsonl.gz"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt"):
        list(iter_documents([tmp_path / "empty"]))


def _docs():
    return [Document(id="a", text="première ligne\nsecond", lang="fr", meta={"k": [1, 2]}),
            Document(id="b", text="code = 1", domain="code", source="s.py"), Document(id="c", text="")]


@pytest.mark.parametrize("name", ["out.jsonl", "out.jsonl.gz", "out.jsonl.zst", "out.parquet"])
def test_written_documents_read_back_the_same(tmp_path, name):
    with DocumentWriter(tmp_path / name) as writer:
        for doc in _docs():
            writer.write(doc)
    assert not list(tmp_path.glob("*.tmp"))
    assert list(iter_documents([tmp_path / name])) == _docs()


def test_a_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError):
        with DocumentWriter(tmp_path / "out.jsonl") as writer:
            writer.write(_docs()[0])
            raise RuntimeError("crash midway")
    assert list(tmp_path.iterdir()) == []


def test_lenient_reading_sends_bad_lines_to_the_rejects_file(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(b'{"text": "good one"}\n{"text": "broken\n{"text": "\xff"}\n[1]\n'
                                        b'{"txt": "typo"}\n{"text": "good two"}\n')
    rejects = RejectWriter(tmp_path / "rejects.jsonl")
    docs = list(iter_documents([tmp_path / "in.jsonl"], on_error=rejects))
    rejects.close()
    assert [d.text for d in docs] == ["good one", "good two"]
    rows = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [r["where"].rsplit(":", 1)[1] for r in rows] == ["2", "3", "4", "5"]
    assert "not valid JSON" in rows[0]["reason"] and rows[0]["raw"].startswith('{"text": "broken')
    assert "invalid UTF-8" in rows[1]["reason"] and "\\xff" in rows[1]["raw"]
    assert "field 'text'" in rows[3]["reason"]


def test_parquet_rows_without_text_are_rejected(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["ok", None], "id": ["1", "2"]}), tmp_path / "p.parquet")
    rejects = RejectWriter(tmp_path / "r.jsonl")
    assert [d.id for d in iter_documents([tmp_path / "p.parquet"], on_error=rejects)] == ["1"]
    assert rejects.count == 1
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "q.parquet")
    with pytest.raises(DataError, match="no 'text' column"):
        list(iter_documents([tmp_path / "q.parquet"]))
