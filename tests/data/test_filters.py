"""Heuristic filters: for every rule, documents that must pass and documents that must fail, and
the rejection names the rule."""

import pytest

from qwen2.data.filters import (C4Quality, CodeQuality, FineWebQuality, GopherQuality, GopherRepetition,
                                apply_heuristics, c4_clean, code_quality, fineweb_quality, gopher_quality,
                                gopher_repetition)

GOOD_PROSE = (
    "The history of the printing press is closely tied to the spread of literacy in Europe. Before it, books "
    "were copied by hand, which made them rare and expensive. Gutenberg's machine, built around 1450, combined "
    "movable metal type with an oil-based ink and a screw press adapted from wine making.\n\n"
    "Within fifty years, presses were working in more than two hundred cities. Printers competed to publish "
    "bibles, grammars and almanacs, and the price of a book fell sharply. Scholars could now compare identical "
    "copies of a text, which changed how knowledge was checked and shared.\n\n"
    "Historians still debate how quickly ordinary people gained access to printed material, but few doubt that "
    "the press transformed religion, science and politics over the following centuries."
)

GOOD_CODE = '''import math


def is_prime(n: int) -> bool:
    """Return True when n is a prime number."""
    if n < 2:
        return False
    for k in range(2, math.isqrt(n) + 1):
        if n % k == 0:
            return False
    return True
'''


def test_good_prose_passes_every_rule():
    assert gopher_quality(GOOD_PROSE, "en", GopherQuality()) is None
    assert gopher_repetition(GOOD_PROSE, "en", GopherRepetition()) is None
    assert fineweb_quality(GOOD_PROSE, FineWebQuality()) is None
    cleaned, rejection = c4_clean(GOOD_PROSE, C4Quality())
    assert rejection is None and "Gutenberg" in cleaned
    assert apply_heuristics(GOOD_PROSE, "en", "web")[1] is None


@pytest.mark.parametrize("text,rule", [
    ("Too short to be a document at all.", "gopher.word_count"),
    (" ".join(["supercalifragilisticexpialidocious"] * 60), "gopher.mean_word_length"),
    (GOOD_PROSE + " " + "#tag " * 40, "gopher.symbol_ratio"),
    ("\n".join(f"- item number {i} of the list with the and of" for i in range(60)), "gopher.bullet_lines"),
    ("\n".join(f"and then the story of line {i} went on and on through the long and quiet night..."
               for i in range(60)), "gopher.ellipsis_lines"),
    (" ".join(["12345", "67.89", "the", "of", "+-+-"] * 30), "gopher.alpha_words"),
    (" ".join(["Lorenzo", "walked", "quickly", "through", "markets", "yesterday"] * 12), "gopher.stop_words"),
])
def test_gopher_quality_rejects(text, rule):
    rejection = gopher_quality(text, "en", GopherQuality())
    assert rejection is not None and rejection.rule == rule, rejection


def test_stop_words_and_word_rules_are_skipped_where_they_do_not_apply():
    french = " ".join(["Le", "chat", "dort", "sur", "la", "chaise", "près", "du", "feu", "ce", "soir."] * 8)
    assert gopher_quality(french, "fr", GopherQuality()) is None  # no English stop words needed
    chinese = "印刷术的发明对欧洲识字率的提高有着密切的关系。" * 20  # no spaces: word rules skipped
    assert gopher_quality(chinese, "zh", GopherQuality()) is None
    assert gopher_quality(chinese, "en", GopherQuality()).rule == "gopher.word_count"


@pytest.mark.parametrize("text,rule", [
    ("\n\n".join(["Buy cheap watches online today with free shipping."] * 5 + [GOOD_PROSE]),
     "gopher.duplicate_paragraphs"),
    ("\n".join(["Click here to subscribe to the newsletter."] * 8 + GOOD_PROSE.split(". ")),
     "gopher.duplicate_lines"),
    (GOOD_PROSE.replace("\n\n", " ") + " " + "best price best price " * 60, "gopher.top_2_gram"),
    (GOOD_PROSE.replace("\n\n", " ") + " " + " ".join(f"w{i}" for i in range(30)) * 4, "gopher.duplicate_5_grams"),
])
def test_gopher_repetition_rejects(text, rule):
    rejection = gopher_repetition(text, "en", GopherRepetition())
    assert rejection is not None and rejection.rule == rule, rejection


def test_c4_drops_boilerplate_lines_and_bad_pages():
    page = ("Accept our cookie policy to continue\n" + GOOD_PROSE +
            "\nPlease enable JavaScript to view the comments powered by Disqus.\nShare\n")
    cleaned, rejection = c4_clean(page, C4Quality())
    assert rejection is None
    assert "cookie" not in cleaned and "JavaScript" not in cleaned and "\nShare" not in cleaned
    assert c4_clean(GOOD_PROSE + " Lorem ipsum dolor sit amet.", C4Quality())[1].rule == "c4.lorem_ipsum"
    assert c4_clean(GOOD_PROSE + " function f() { return 1; }", C4Quality())[1].rule == "c4.curly_bracket"
    assert c4_clean("Menu\nHome\nAbout us\nContact", C4Quality())[1].rule == "c4.sentences"


@pytest.mark.parametrize("text,rule", [
    ("\n".join(["Home", "Products", "Shop now", "Log in", "Cart"] * 4 + ["A real sentence at the end."]),
     "fineweb.line_punctuation"),
    ("\n".join(["Short line."] * 3 + ["Another one."] * 0 + [f"Item {i}." for i in range(20)] + [GOOD_PROSE]),
     "fineweb.short_lines"),
    (GOOD_PROSE + "\n" + "\n".join(["This exact sentence repeats again and again on the page."] * 8),
     "fineweb.duplicate_line_chars"),
])
def test_fineweb_rejects(text, rule):
    rejection = fineweb_quality(text, FineWebQuality())
    assert rejection is not None and rejection.rule == rule, rejection


@pytest.mark.parametrize("text,rule", [
    ("x = [" + ", ".join(str(i) for i in range(400)) + "]\n", "code.max_line_length"),
    ("\n".join("value_%d = '%s'" % (i, "a" * 150) for i in range(20)), "code.mean_line_length"),
    ("\n".join(["#" * 40, "# -*- ---- *** ---- -*-", "#" * 40] * 10), "code.alphanumeric"),
    ("# This file was automatically generated by protoc. Do not edit.\n" + GOOD_CODE, "code.autogenerated"),
])
def test_code_rules_reject(text, rule):
    rejection = code_quality(text, CodeQuality())
    assert rejection is not None and rejection.rule == rule, rejection


def test_code_is_judged_by_code_rules_not_prose_rules():
    assert code_quality(GOOD_CODE, CodeQuality()) is None
    assert apply_heuristics(GOOD_CODE, None, "code")[1] is None
    assert apply_heuristics(GOOD_CODE, None, "web")[1] is not None  # as prose it fails (few words, brackets...)
