"""Language identification, offline: py3langid (a naive-Bayes byte n-gram model of 140+ languages,
shipped inside the wheel and loaded without pickle) plus script detection, which settles the cases
a byte model gets wrong or is unsure of: kana means Japanese even in kanji-heavy text, Hangul
Korean, and Thai, Lao, Khmer and Burmese each have their own script.

`identify(text)` -> LanguageGuess(lang, confidence, script). Text with no letters at all is "und"
(undetermined) with confidence 0. Only the first `max_chars` characters are read: language is
settled long before the end of a book, and this bounds the cost per document.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from dataclasses import dataclass

# The languages the Qwen2 report names or evaluates (about 30), as ISO 639-1 codes.
REPORT_LANGUAGES = ("en", "zh", "es", "fr", "de", "ar", "ru", "ko", "ja", "th", "vi", "pt", "it", "nl", "pl", "tr",
                    "id", "ms", "he", "hi", "bn", "ur", "fa", "cs", "uk", "el", "sv", "da", "fi", "hu", "ro", "tl",
                    "my", "km", "lo")

# (first code point, script) for the scripts that matter here; a range runs to the next start.
_SCRIPT_STARTS = [
    (0x0041, "Latin"), (0x0250, "other"), (0x0370, "Greek"), (0x0400, "Cyrillic"), (0x0530, "Armenian"),
    (0x0590, "Hebrew"), (0x0600, "Arabic"), (0x0700, "other"), (0x0750, "Arabic"), (0x0780, "other"),
    (0x0900, "Devanagari"), (0x0980, "Bengali"), (0x0A00, "other"), (0x0E00, "Thai"), (0x0E80, "Lao"),
    (0x0F00, "other"), (0x1000, "Myanmar"), (0x10A0, "other"), (0x1100, "Hangul"), (0x1200, "other"),
    (0x1780, "Khmer"), (0x1800, "other"), (0x1E00, "Latin"), (0x1F00, "Greek"), (0x2000, "other"),
    (0x2E80, "Han"), (0x3040, "Kana"), (0x3100, "other"), (0x3130, "Hangul"), (0x3190, "other"),
    (0x3400, "Han"), (0x4DC0, "other"), (0x4E00, "Han"), (0xA000, "other"), (0xAC00, "Hangul"),
    (0xD7B0, "other"), (0xF900, "Han"), (0xFB00, "other"), (0xFB1D, "Hebrew"), (0xFB50, "Arabic"),
    (0xFE00, "other"), (0xFF66, "Kana"), (0xFFA0, "other"), (0x20000, "Han"), (0x2FA20, "other"),
]
_STARTS = [start for start, _ in _SCRIPT_STARTS]
_SCRIPT_LANGUAGE = {"Hangul": "ko", "Thai": "th", "Lao": "lo", "Khmer": "km", "Myanmar": "my"}


@dataclass(frozen=True)
class LanguageGuess:
    lang: str          # ISO 639-1 (or 639-3 where py3langid has no two-letter code); "und" = no letters
    confidence: float  # 0..1
    script: str        # the most common script among the letters ("none" without letters)


def script_counts(text: str) -> Counter:
    """Letters per script (non-letters are not counted)."""
    counts: Counter = Counter()
    for c in text:
        if c.isalpha():
            i = bisect.bisect_right(_STARTS, ord(c)) - 1
            counts[_SCRIPT_STARTS[i][1] if i >= 0 else "other"] += 1
    return counts


_model = None
_model_lock = threading.Lock()


def _identifier():
    global _model
    with _model_lock:
        if _model is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            _model = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return _model


def identify(text: str, *, max_chars: int = 2000) -> LanguageGuess:
    sample = text[:max_chars]
    scripts = script_counts(sample)
    letters = sum(scripts.values())
    if not letters:
        return LanguageGuess("und", 0.0, "none")
    script, count = scripts.most_common(1)[0]
    share = count / letters
    if scripts["Kana"] >= 0.05 * letters and (scripts["Kana"] + scripts["Han"]) >= 0.5 * letters:
        return LanguageGuess("ja", share, "Kana" if script == "Kana" else script)
    if script in _SCRIPT_LANGUAGE and share >= 0.5:
        return LanguageGuess(_SCRIPT_LANGUAGE[script], share, script)
    lang, confidence = _identifier().classify(sample)
    if script == "Han" and share >= 0.5 and lang not in ("zh", "yue", "wuu", "ja"):
        lang, confidence = "zh", share  # Han without kana: Chinese, whatever the byte model's second thoughts
    return LanguageGuess(lang, float(confidence), script)
