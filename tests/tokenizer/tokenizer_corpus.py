"""Real text for parity tests: Python stdlib sources and translated UI strings from gettext catalogs."""

from __future__ import annotations

import gettext
import sysconfig
from pathlib import Path

LOCALE_DIR = Path("/usr/share/locale")


def python_sources(max_chars: int) -> list[str]:
    """Whole stdlib .py files (sorted, so the selection is stable) until `max_chars` is reached."""
    docs: list[str] = []
    total = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return docs


def locale_strings(lang: str, max_chars: int) -> list[str]:
    """msgstr values of /usr/share/locale/<lang>/LC_MESSAGES/*.mo, one document per catalog."""
    docs: list[str] = []
    total = 0
    for path in sorted((LOCALE_DIR / lang / "LC_MESSAGES").glob("*.mo")):
        try:
            with path.open("rb") as f:
                catalog = gettext.GNUTranslations(f)._catalog  # no public way to list all entries
        except (OSError, UnicodeDecodeError, ValueError):
            continue  # a few catalogs are not UTF-8
        text = "\n".join(v for k, v in catalog.items() if k and isinstance(v, str))
        if text:
            docs.append(text[: max_chars - total])
            total += len(docs[-1])
        if total >= max_chars:
            break
    return docs
