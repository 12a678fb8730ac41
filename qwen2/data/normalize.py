"""Text normalisation before filtering and dedup: encoding repair, Unicode normal form, control
characters, whitespace. Code keeps its indentation and inner spacing; prose also has its odd
spaces unified and runs of spaces collapsed.

Encoding repair is ftfy's (mojibake such as "cafÃ©" -> "café", HTML entities left alone), the
well-kept library for exactly this; the rest is a few rules written out here.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# C0 and C1 control characters except tab and newline, lone surrogates (undecodable bytes smuggled
# through surrogateescape) and U+FFFD (what a decoder left for bytes it could not read: no text to
# learn from); zero-width and bidi marks are format characters, kept.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffd]")
_ODD_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_SPACE_RUN = re.compile(r"[ \t]{2,}")
_BLANK_RUN = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class NormalizeConfig:
    repair_encoding: bool = True  # ftfy.fix_text (mojibake, broken surrogate pairs)
    unicode_form: str | None = "NFC"  # NFKC would also fold full-width forms and ligatures
    collapse_spaces: bool = True  # prose only: runs of spaces / tabs -> one space, odd spaces -> " "
    max_blank_lines: int = 2

    def __post_init__(self) -> None:
        if self.unicode_form not in (None, "NFC", "NFKC", "NFD", "NFKD"):
            raise ValueError(f"unicode_form must be NFC, NFKC, NFD, NFKD or null (got {self.unicode_form!r})")
        if self.max_blank_lines < 0:
            raise ValueError("max_blank_lines must be >= 0")


def normalize_text(text: str, *, code: bool = False, config: NormalizeConfig = NormalizeConfig()) -> str:
    """The normalised text. `code`: keep indentation and spacing inside lines."""
    if config.repair_encoding:
        import ftfy

        # uncurl_quotes off: typographic quotes are real text; HTML entities are left as written
        text = ftfy.fix_text(text, uncurl_quotes=False, unescape_html=False, normalization=None)
    if config.unicode_form:
        text = unicodedata.normalize(config.unicode_form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    if config.collapse_spaces and not code:
        text = _ODD_SPACES.sub(" ", text)
        text = _SPACE_RUN.sub(" ", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = _BLANK_RUN.sub("\n" * (config.max_blank_lines + 1), text) if config.max_blank_lines else \
        re.sub(r"\n{2,}", "\n", text)
    return text.strip("\n") if code else text.strip()
