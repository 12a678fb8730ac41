"""Normalisation: mojibake repaired, one Unicode form, control characters gone, whitespace unified
for prose and left alone inside code lines."""

import pytest

from qwen2.data.normalize import NormalizeConfig, normalize_text


def test_mojibake_is_repaired_and_forms_unified():
    broken = "The cafÃ© served crÃ¨me brÃ»lÃ©e."  # UTF-8 read as Latin-1
    assert normalize_text(broken) == "The café served crème brûlée."
    decomposed = "Cafe\u0301"  # e + combining acute
    assert normalize_text(decomposed) == "Caf\u00e9"
    assert normalize_text("“Quoted” text stays curly.") == "“Quoted” text stays curly."
    assert normalize_text("Fish &amp; chips") == "Fish &amp; chips"  # markup is not ours to rewrite


def test_controls_newlines_and_spaces_in_prose():
    text = "Line one\x00\x07 has\u00a0odd   spaces\r\nLine two\t\tends here   \r\n\n\n\n\nLast\x1b line\ud800"
    assert normalize_text(text) == "Line one has odd spaces\nLine two ends here\n\n\nLast line"


def test_code_keeps_its_indentation_and_inner_spacing():
    code = "def f(x):\r\n    if x:\t# tab kept\r\n        return  x   \r\n\n\n\n\n    return None\n"
    assert normalize_text(code, code=True) == "def f(x):\n    if x:\t# tab kept\n        return  x\n\n\n    return None"


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="unicode_form"):
        NormalizeConfig(unicode_form="NFX")
    assert normalize_text("a\n\n\n\nb", config=NormalizeConfig(max_blank_lines=0)) == "a\nb"
    assert normalize_text("cafÃ©", config=NormalizeConfig(repair_encoding=False)) == "cafÃ©"
