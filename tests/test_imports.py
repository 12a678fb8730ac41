"""Imports point one way (config <- model <- checkpoint <- inference <- serve <- cli); a few heavy or
untrusted-input libraries stay in the one module that owns them."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qwen2"

# module prefix -> qwen2 subpackages it must never import
FORBIDDEN = {
    "qwen2/config.py": ("qwen2.model", "qwen2.checkpoint", "qwen2.inference", "qwen2.tokenizer", "qwen2.cli"),
    "qwen2/model/": ("qwen2.checkpoint", "qwen2.inference", "qwen2.cli", "qwen2.tokenizer", "qwen2.serve",
                     "qwen2.train"),
    "qwen2/tokenizer/": ("qwen2.model", "qwen2.checkpoint", "qwen2.inference", "qwen2.cli", "qwen2.config"),
    "qwen2/checkpoint/": ("qwen2.inference", "qwen2.cli"),
    "qwen2/inference/": ("qwen2.cli", "qwen2.serve"),
    "qwen2/serve/": ("qwen2.cli",),
    "qwen2/eval/": ("qwen2.cli", "qwen2.synth", "qwen2.serve"),
    "qwen2/synth/sandbox": ("qwen2",),  # standard library only: the init runs in a bare interpreter
}
# third-party module -> the only files allowed to import it
OWNERS = {"gguf": ("qwen2/checkpoint/gguf.py",), "transformers": (), "fastapi": ("qwen2/serve/app.py",),
          "uvicorn": ("qwen2/cli.py",), "pickle": ()}


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_import_direction_and_owners():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).as_posix()
        imported = imports_of(path)
        for prefix, forbidden in FORBIDDEN.items():
            if rel.startswith(prefix):
                problems += [f"{rel} imports {m}" for m in imported
                             if any(m == f or m.startswith(f + ".") for f in forbidden)]
        for library, owners in OWNERS.items():
            if rel not in owners:
                problems += [f"{rel} imports {m}" for m in imported if m == library or m.startswith(library + ".")]
    assert not problems, problems
