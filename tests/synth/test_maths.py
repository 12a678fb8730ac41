"""Maths problems, answer reading and rejection sampling: known right and wrong cases."""

from __future__ import annotations

import json
import re
from fractions import Fraction

import pytest

from qwen2.eval.maths import (KINDS, extract_answer, format_number, generate_problems, is_correct, paired_difference,
                              parse_number, wilson_interval)
from qwen2.inference.batch import Sample


def solve_independently(problem) -> Fraction:
    """Recompute a problem's answer from its text alone (not from the generator's arithmetic)."""
    q = problem.question
    nums = [int(n) for n in re.findall(r"-?\d+", q)]
    if problem.kind == "arithmetic":
        expression = q.removeprefix("What is ").rstrip("?").replace("\u00d7", "*").replace("\u00f7", "/")
        return Fraction(eval(expression)).limit_denominator()  # noqa: S307 -- our own digits and operators
    if problem.kind == "algebra":
        if q.startswith("If"):
            s, a_b = nums[0], re.search(r"and (\d*)x - (\d*)y = (-?\d+)", q)
            a, b, c = int(a_b.group(1) or 1), int(a_b.group(2) or 1), int(a_b.group(3))
            return Fraction(c + b * s, a + b)  # ax - b(s - x) = c
        if "(" in q:
            a, b, c = re.search(r"(\d+)\(x - (\d+)\) = (-?\d+)", q).groups()
            return Fraction(int(c), int(a)) + int(b)
        a, sign, b, c = re.search(r"(\d+)x ([+-]) (\d+) = (-?[\d/]+)", q).groups()
        return (Fraction(c) - (int(b) if sign == "+" else -int(b))) / int(a)
    t = problem.meta["template"]
    fractions = [Fraction(f) for f in re.findall(r"\d+/\d+", q)]
    if t == "change":
        count, price, bill = nums[0], nums[1], nums[2]
        return Fraction(bill - count * price)
    if t == "journey":
        return Fraction(nums[0] * nums[1] + nums[2] * nums[3])
    if t == "sharing":
        start, each, friends, more = nums
        return Fraction(start - each * friends + more)
    if t == "book":
        pages = nums[0]
        rest = pages * (1 - fractions[0])
        return rest * (1 - fractions[1])
    if t == "ages":
        gap, years, total = nums
        return Fraction(total - 2 * years - gap, 2)
    if t == "discount":
        return Fraction(nums[0]) * (100 - nums[1]) / 100
    cups, people, wanted = nums
    return Fraction(cups * wanted, people)


@pytest.mark.parametrize("kind", KINDS)
def test_every_generated_answer_is_right(kind):
    problems = generate_problems(150, seed=7, kinds=(kind,))
    assert len({p.question for p in problems}) == 150
    for p in problems:
        assert solve_independently(p) == p.answer, p


def test_problem_sets_are_a_pure_function_of_the_seed():
    a, b = generate_problems(30, seed=5), generate_problems(30, seed=5)
    assert [p.question for p in a] == [p.question for p in b]
    assert [p.question for p in generate_problems(30, seed=6)] != [p.question for p in a]
    assert {p.kind for p in a} == set(KINDS)
    assert all(any(c.isdigit() for c in p.question) for p in a)
    with pytest.raises(ValueError, match="geometry"):
        generate_problems(3, seed=0, kinds=("geometry",))


@pytest.mark.parametrize("reply,expected", [
    ("so the total is \\boxed{42}.", "42"),
    ("first \\boxed{1}, then correcting: \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
    ("\\boxed{\\text{{7} apples}}", "\\text{{7} apples}"),  # nested braces
    ("Hence the answer is 17 km.", "17 km."),
    ("Answer: -2.5", "-2.5"),
    ("steps...\n#### 1,234", "1,234"),
    ("x = 3\ny = 4\nSo Ben has 12 marbles left.", "12"),
    ("no numbers at all", None),
    ("", None),
])
def test_the_final_answer_is_read_like_maths_evaluations_do(reply, expected):
    assert extract_answer(reply) == expected


@pytest.mark.parametrize("text,value", [
    ("42", Fraction(42)), ("-7", Fraction(-7)), ("1,234", Fraction(1234)), ("$1,234.50", Fraction(246900, 200)),
    ("\\frac{3}{4}", Fraction(3, 4)), ("\\dfrac34", Fraction(3, 4)), ("\\frac{-3}{2}", Fraction(-3, 2)),
    ("3/4", Fraction(3, 4)), ("0.75", Fraction(3, 4)), ("x = 5", Fraction(5)), ("1 1/2", Fraction(3, 2)),
    ("-2 1/2", Fraction(-5, 2)), ("12 km", Fraction(12)), ("\\$5", Fraction(5)), ("25\\%", Fraction(25)),
    ("\\text{15 pages}", Fraction(15)), ("5.", Fraction(5)), ("\u22123", Fraction(-3)), (".5", Fraction(1, 2)),
    ("\\frac{9}{2}\\text{ cups}", Fraction(9, 2)), ("42, since 6 x 7 = 42", Fraction(42)), ("about 5", Fraction(5)),
    ("USD 12", Fraction(12)), ("\\dfrac{ 3 }{ 4 }", Fraction(3, 4)),
])
def test_equivalent_answers_parse_to_the_same_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("text", ["1,2", "5 6", "1/0", "seven", "", None, "x", "12,34,5", "\\frac{x+1}{2}",
                                  "x + 1", "(x+1)/2"])
def test_non_answers_parse_to_nothing(text):
    assert parse_number(text) is None


def test_is_correct_accepts_equal_values_only():
    assert is_correct("... \\boxed{\\frac{7}{2}}", Fraction(7, 2))
    assert is_correct("The answer is 3.5", Fraction(7, 2))
    assert not is_correct("The answer is 3.49", Fraction(7, 2))
    assert not is_correct("\\boxed{35}", Fraction(7, 2))
    assert not is_correct("I could not solve it.", Fraction(0))
    assert format_number(Fraction(7, 2)) == "3.5" and format_number(Fraction(1, 3)) == "1/3"


def test_intervals():
    low, high = wilson_interval(60, 100)
    assert 0.50 < low < 0.51 and 0.69 < high < 0.70  # the textbook value: 0.502 - 0.691
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    d = paired_difference([True, False, False, True], [True, True, True, False])
    assert d["gained"] == 2 and d["lost"] == 1 and d["difference"] == 0.25


def fake_sampler(replies_for):
    def sample_chats(pretrained, conversations, *, k, params, seed=0, progress=True, description=""):
        return [[Sample(text, reason, len(text), 1000 + j) for j, (text, reason) in enumerate(replies_for(c[-1]["content"], k))]
                for c in conversations]
    return sample_chats


def test_rejection_sampling_keeps_right_solutions_and_pairs_them(monkeypatch, byte_tokenizer):
    import qwen2.synth.maths as maths
    from qwen2.synth.maths import MathsSynthesis, rejection_sample, training_problems
    from qwen2.synth.records import output_paths, write_output

    spec = MathsSynthesis(problems=12, k=4, keep=2, held_out=50)
    problems, _ = training_problems(spec)
    answers = {p.question: p.answer_text for p in problems}

    def replies(question, k):
        right = f"Working... so the result is \\boxed{{{answers[question]}}}."
        return [(right, "stop"), (right, "stop"),  # a duplicate counts once
                ("Working... \\boxed{-99999}", "stop"), (f"Long... {answers[question]}", "length")][:k]

    monkeypatch.setattr(maths, "sample_chats", fake_sampler(replies))
    pretrained = type("P", (), {"source": "stand-in"})()
    out = rejection_sample(pretrained, spec, progress=False)
    assert out.summary["verdicts"] == {"correct": 24, "wrong": 12, "truncated": 12}
    assert len(out.conversations) == 12  # the duplicate right solution counted once
    assert len(out.preferences) == 12 and len(out.samples) == 48
    pair = out.preferences[0]
    assert "\\boxed{-99999}" in pair["rejected"][0]["content"] and answers[pair["prompt"][-1]["content"]] in pair["chosen"][0]["content"]
    meta = out.conversations[0]["meta"]
    assert meta["verdict"] == "correct" and meta["model"] == "stand-in" and meta["seed"] == 1000
    assert {s["meta"]["verdict"] for s in out.samples} == {"correct", "wrong", "truncated"}

    # the files are the trainers' formats
    import tempfile
    from pathlib import Path

    from qwen2.train.dpo import load_preferences
    from qwen2.train.sft import load_conversations

    with tempfile.TemporaryDirectory() as d:
        paths = write_output(out, Path(d) / "maths.jsonl")
        assert paths == output_paths(Path(d) / "maths.jsonl")
        assert len(load_conversations(paths["conversations"], byte_tokenizer)) == 12
        assert len(load_preferences(paths["preferences"], byte_tokenizer, 4096)) == 12
        assert json.loads(paths["summary"].read_text())["kept_conversations"] == 12


def test_held_out_problems_never_reach_the_training_set():
    from qwen2.synth.maths import HELD_OUT_SEED, MathsSynthesis, training_problems

    # arithmetic has the smallest space: some questions of a big draw repeat across seeds
    spec = MathsSynthesis(problems=3000, kinds=("arithmetic",), held_out=3000)
    kept, dropped = training_problems(spec)
    held_out = {p.question for p in generate_problems(3000, seed=HELD_OUT_SEED, kinds=("arithmetic",))}
    assert dropped > 0 and len(kept) == 3000
    assert not held_out & {p.question for p in kept}
    with pytest.raises(ValueError, match="held-out"):
        MathsSynthesis(seed=HELD_OUT_SEED)
