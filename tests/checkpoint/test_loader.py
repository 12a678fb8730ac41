"""Model name resolution: local paths, hub ids (through huggingface_hub's real cache code), errors."""

import os
import subprocess
import sys

import pytest

from qwen2.checkpoint import CheckpointError, resolve, save_hf_model
from qwen2.config import PRESETS
from qwen2.model import Qwen2ForCausalLM


def hub_cache_with(tmp_path, repo_id: str):
    """Lay out a Hugging Face hub cache holding one snapshot of a tiny model, as a download would."""
    cache = tmp_path / "hub"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    model = Qwen2ForCausalLM(PRESETS["tiny"])
    model.init_weights(seed=0)
    save_hf_model(model, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return cache, snapshot


def run_resolve(name: str, cache) -> subprocess.CompletedProcess:
    # huggingface_hub reads its cache location and offline flag at import: use a fresh interpreter.
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    code = "import sys; from qwen2.checkpoint.loader import resolve; print(resolve(sys.argv[1]))"
    return subprocess.run([sys.executable, "-c", code, name], env=env, capture_output=True, text=True, timeout=120)


def test_hub_id_resolves_through_the_hub_cache(tmp_path):
    cache, snapshot = hub_cache_with(tmp_path, "Qwen/Qwen2.5-Tiny")
    result = run_resolve("Qwen/Qwen2.5-Tiny", cache)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(snapshot)


def test_unknown_hub_id_offline_is_a_clear_error(tmp_path):
    cache, _ = hub_cache_with(tmp_path, "Qwen/Qwen2.5-Tiny")
    result = run_resolve("Qwen/Does-Not-Exist", cache)
    assert result.returncode != 0
    assert "CheckpointError: no local path 'Qwen/Does-Not-Exist', and as a hub id: hub model" in result.stderr


def test_local_paths(tmp_path):
    save_hf_model(Qwen2ForCausalLM(PRESETS["tiny"]), tmp_path / "m")
    assert resolve(tmp_path / "m") == tmp_path / "m"
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        resolve(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not found"):
        resolve(str(tmp_path / "missing" / "model"))
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "only.gguf").write_bytes(b"")
    assert resolve(tmp_path / "g") == tmp_path / "g" / "only.gguf"


def test_cli_reports_a_missing_model_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "qwen2", "generate", "--model", str(tmp_path / "nope"), "hi"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"qwen2 generate: error: model {str(tmp_path / 'nope')!r} not found: not a file, not a directory, "
        "and not a hub id (org/name)"]
