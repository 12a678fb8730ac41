"""Execution feedback: passing solutions kept, failing ones paired against them, model-written
tests decided by agreement, contaminated outputs dropped; all through the real sandbox."""

from __future__ import annotations

import json

import pytest

import qwen2.synth.code as code
from qwen2.eval.humaneval import load_code_problems
from qwen2.inference.batch import Sample
from qwen2.synth.code import CodeSynthesis, agreement, execution_feedback, suite_from_reply
from qwen2.synth.sandbox import Limits, Sandbox


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(Limits(wall_seconds=10, cpu_seconds=5))


def fake_sampler(reply_for):
    def sample_chats(pretrained, conversations, *, k, params, seed=0, progress=True, description=""):
        return [[Sample(text, "stop", len(text), seed * 100 + j) for j, text in enumerate(reply_for(c[-1]["content"], k))]
                for c in conversations]
    return sample_chats


def fenced(source: str) -> str:
    return f"Here you go:\n```python\n{source}```\n"


def test_tested_problems_keep_passing_solutions_and_pair_them(monkeypatch):
    problems = {p.task_id: p for p in load_code_problems("humaneval:train")[:4]}
    monkeypatch.setattr(code, "load_code_problems", lambda source: list(problems.values()))
    by_prompt = {p.messages()[0]["content"]: p for p in problems.values()}

    def replies(content, k):
        p = by_prompt[content]
        right = fenced(p.prompt + p.canonical_solution)
        wrong = fenced(f"def {p.entry_point}(*args, **kwargs):\n    return None\n")
        loop = fenced(f"def {p.entry_point}(*args, **kwargs):\n    while True:\n        pass\n")
        return [wrong, right, right, loop][:k]

    monkeypatch.setattr(code, "sample_chats", fake_sampler(replies))
    spec = CodeSynthesis(k=4, decontaminate=(), timeout=5)
    out = execution_feedback(type("P", (), {"source": "stand-in"})(), Sandbox(Limits(wall_seconds=3, cpu_seconds=2)),
                             spec, progress=False)
    s = out.summary
    assert s["passed"] == 8 and s["failed"] == 8 and s["kept"] == 4 and s["dropped_duplicate"] == 4
    assert s["sandbox_verdicts"] == {"passed": 8, "failed": 4, "timeout": 4}
    assert len(out.preferences) == 4 and all("return None" in p["rejected"][0]["content"] for p in out.preferences)
    assert {c["meta"]["task_id"] for c in out.conversations} == set(problems)
    assert all(c["meta"]["verdict"] == "passed" for c in out.conversations)


def test_outputs_that_contain_an_evaluation_problem_are_dropped(monkeypatch, sandbox):
    train = load_code_problems("humaneval:train")[:2]
    test = load_code_problems("humaneval:test")[0]

    def replies(content, k):
        # a "solution" that pastes an evaluation problem (prompt, solution and tests) after a right one
        p = next(q for q in train if q.messages()[0]["content"] == content)
        return [fenced(p.prompt + p.canonical_solution + "\n\n" + test.prompt + test.canonical_solution + "\n" + test.test)]

    monkeypatch.setattr(code, "sample_chats", fake_sampler(replies))
    spec = CodeSynthesis(k=1, decontaminate=("humaneval:test",))
    monkeypatch.setattr(code, "load_code_problems",
                        lambda source: train if source == "humaneval:train" else load_code_problems(source))
    out = execution_feedback(type("P", (), {"source": "stand-in"})(), sandbox, spec, progress=False)
    assert out.summary["passed"] == 2 and out.summary["dropped_contaminated"] == 2 and out.conversations == []
    assert {s["meta"].get("contaminates") for s in out.samples} == {test.task_id}


def test_untested_problems_are_judged_by_agreement_with_model_written_tests(monkeypatch, sandbox, tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text(json.dumps({"task_id": "mine/0", "entry_point": "add",
                                "prompt": "def add(a, b):\n    \"\"\"The sum of a and b.\"\"\"\n"}) + "\n")

    def replies(content, k):
        if content.startswith("Write"):  # the tests prompt: one good suite, one wrong, one with no asserts
            return [fenced("assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"), fenced("assert add(1, 2) == 4\n"),
                    "I cannot write tests."][:k]
        return [fenced("def add(a, b):\n    return a + b\n"), fenced("def add(a, b):\n    return b + a\n"),
                fenced("def add(a, b):\n    return a - b\n"), fenced("def add(a, b):\n    return a + b + 1\n")][:k]

    monkeypatch.setattr(code, "sample_chats", fake_sampler(replies))
    spec = CodeSynthesis(problems=str(path), k=4, tests_per_problem=3, keep=2, decontaminate=())
    out = execution_feedback(type("P", (), {"source": "stand-in"})(), sandbox, spec, progress=False)
    kept = [c["messages"][-1]["content"] for c in out.conversations]
    assert len(kept) == 2 and all("a + b\n" in k or "b + a\n" in k for k in kept)
    assert out.summary["passed"] == 2 and out.summary["without_tests"] == 1
    assert out.samples[0]["meta"]["judged_by"] == "model-written tests"


def test_suites_and_agreement():
    suite = suite_from_reply(fenced("x = 1\nassert f(1) == 2\nassert f(2) == (3\nassert g(1)\n"), "f", 5)
    assert suite == "def check(candidate):\n    f = candidate\n    assert f(1) == 2\n"
    assert suite_from_reply("no code here", "f", 5) is None
    assert agreement([frozenset({0, 1}), frozenset({0, 1}), frozenset({2}), frozenset()]) == {0, 1}
    assert agreement([frozenset(), frozenset()]) == set()
    with pytest.raises(ValueError, match="decontaminate"):
        CodeSynthesis(problems="humaneval:test")
