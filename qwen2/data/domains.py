"""Domain tags (web, code, math, books, multilingual, ...) for documents that arrive without one:
the input's declared domain wins; otherwise the file suffix, then the text's look, then its language."""

from __future__ import annotations

import re
from pathlib import PurePath

CODE_SUFFIXES = frozenset({".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".js", ".ts", ".java", ".go", ".rs",
                           ".rb", ".php", ".sh", ".cs", ".kt", ".swift", ".scala", ".lua", ".sql", ".r", ".jl"})
_CODE_LINE = re.compile(r"^\s*(def |class |import |from \S+ import |#include|function |return\b|if \(|for \(|"
                        r"public |private |const |let |var |fn |func |package )|[;{}]\s*$")
_MATH = re.compile(r"\\(frac|sum|int|sqrt|alpha|beta|theta|cdot|leq|geq|begin\{(equation|align)\})|\$[^$\n]+\$")


def tag_domain(text: str, *, declared: str | None, source: str | None, lang: str | None) -> str:
    if declared:
        return declared
    if source and PurePath(source.split("::")[0]).suffix.lower() in CODE_SUFFIXES:
        return "code"
    lines = [line for line in text.splitlines()[:200] if line.strip()]
    if lines and sum(bool(_CODE_LINE.search(line)) for line in lines) / len(lines) > 0.3:
        return "code"
    if len(_MATH.findall(text[:20_000])) >= 5:
        return "math"
    if lang not in (None, "en", "und"):
        return "multilingual"
    return "web"
