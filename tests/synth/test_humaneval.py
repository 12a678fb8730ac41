"""HumanEval through the sandbox: every canonical solution passes, wrong and forged ones do not."""

from __future__ import annotations

import pytest

from qwen2.eval.humaneval import build_program, extract_code, load_humaneval, pass_at_k, run_solution
from qwen2.synth.sandbox import Limits, Sandbox


@pytest.fixture(scope="module")
def problems():
    return {p.task_id: p for p in load_humaneval()}


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(Limits(wall_seconds=10, cpu_seconds=5))


def test_all_164_canonical_solutions_pass(problems, sandbox):
    assert len(problems) == 164
    failed = [(t, r.verdict, r.detail) for t, p in problems.items()
              if not (r := run_solution(sandbox, p, p.canonical_solution)).passed]
    assert failed == []


@pytest.mark.parametrize("body,verdict", [
    ("    return None\n", "failed"),
    ("    while True:\n        pass\n", "timeout"),
    ("    import sys\n    sys.exit(0)\n", "failed"),
    ("    import os\n    os._exit(0)\n", "failed"),
    ("    class Liar:\n        def __eq__(self, other):\n            return True\n    return Liar()\n", "failed"),
    ("    class Liar(int):\n        def __eq__(self, other):\n            return True\n    return Liar(0)\n", "failed"),
    ("    print('PASSED')\n    raise SystemExit(0)\n", "failed"),
    # shadowing the builtins the guard uses does not help: it bound them before the solution ran
    ("    global type, all\n    class Liar:\n        def __eq__(self, other):\n            return True\n"
     "    type = lambda value: int\n    all = lambda values: True\n    return Liar()\n", "failed"),
])
def test_wrong_and_forged_solutions_fail(problems, sandbox, body, verdict):
    result = run_solution(sandbox, problems["HumanEval/0"], body)
    assert result.verdict == verdict, result


def test_code_is_read_from_a_chat_reply(problems):
    p = problems["HumanEval/0"]
    whole = "def has_close_elements(numbers, threshold):\n    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n"
    reply = f"Here is the solution:\n```python\n{whole}```\nAnd a test:\n```python\nprint(1)\n```"
    assert extract_code(reply, p.entry_point) == whole
    assert extract_code("```\nx = 1\n```", p.entry_point) == "x = 1\n"
    assert extract_code("```python\nunterminated = 1\n", p.entry_point) == "unterminated = 1\n"
    assert extract_code("    return 1\n", p.entry_point) == "    return 1\n"
    program = build_program(p, whole)
    assert p.prompt in program and program.rstrip().endswith("check(_qwen2_guarded(has_close_elements))")
    assert p.prompt + "    return True\n" in build_program(p, "    return True\n")


def test_a_whole_function_reply_passes_and_a_wrong_one_fails(problems, sandbox):
    p = problems["HumanEval/0"]
    good = ("```python\ndef has_close_elements(numbers, threshold):\n    return any(abs(a - b) < threshold "
            "for i, a in enumerate(numbers) for b in numbers[i + 1:])\n```")
    bad = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    assert run_solution(sandbox, p, extract_code(good, p.entry_point)).passed
    assert not run_solution(sandbox, p, extract_code(bad, p.entry_point)).passed


def test_pass_at_k():
    assert pass_at_k(10, 0, 1) == 0 and pass_at_k(10, 10, 1) == 1
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)


def test_a_whole_program_solution_keeps_the_prompts_helpers(problems, sandbox):
    p = problems["HumanEval/38"]  # its tests call encode_cyclic, defined only in the prompt
    reply = ("```python\ndef decode_cyclic(s: str):\n    return encode_cyclic(encode_cyclic(s))\n```")
    result = run_solution(sandbox, p, extract_code(reply, p.entry_point))
    assert result.passed, result


def test_example_usage_after_a_solution_is_dropped(problems, sandbox):
    from qwen2.eval.humaneval import sanitize

    code = ("import math\n\nLIMIT = 10\n\ndef helper(x):\n    return x\n\nclass K:\n    pass\n\n"
            "print(helper(1))\nresult = helper(2)\nassert helper(3) == 4\n"
            "if __name__ == '__main__':\n    print('demo')\nprint(broken(\n")
    assert sanitize(code) == "import math\n\nLIMIT = 10\n\ndef helper(x):\n    return x\n\nclass K:\n    pass\n"
    assert sanitize("def (:\n") == "def (:\n"  # never parses: left to fail
    p = problems["HumanEval/0"]
    reply = ("```python\ndef has_close_elements(numbers, threshold):\n    return any(abs(a - b) < threshold "
             "for i, a in enumerate(numbers) for b in numbers[i + 1:])\n\n"
             "assert has_close_elements([1.0, 2.0], 0.5) is True  # a wrong example of the model's own\n```")
    assert run_solution(sandbox, p, extract_code(reply, p.entry_point)).passed
