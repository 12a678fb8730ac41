"""Documents from .txt / .jsonl / .jsonl.gz files and directories; bad input named by file and line."""

import gzip
import json

import pytest

from qwen2.data.readers import DataError, iter_documents


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
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(DataError, match="unknown file type"):
        list(iter_documents([tmp_path / "x.parquet"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt"):
        list(iter_documents([tmp_path / "empty"]))
