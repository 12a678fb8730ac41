"""Execution feedback for code (Qwen2 report §4.1): sample k solutions per problem, run them in
the sandbox, keep what passes, pair passing with failing.

Problems with tests (HumanEval's format) are judged by their tests. Problems without tests get
tests written by the model first: for each problem `tests_per_problem` suites of assert lines,
then the k solutions run against every suite, and agreement decides (a CodeT-style dual
agreement): solutions that pass the same set of suites form a group, a group scores (its size) x
(the number of suites it passes), and the solutions of the best group are kept if they pass at
least one suite. Everything runs in the sandbox, one program per (solution, suite).

Every kept conversation is checked against the evaluation sets (`decontaminate`, by default the
HumanEval half not used for synthesis) with the data pipeline's n-gram + LCS rule; contaminated
ones are dropped and counted.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from qwen2.eval.humaneval import CodeProblem, extract_code, load_code_problems, run_solution
from qwen2.inference.batch import sample_chats
from qwen2.inference.sampling import SamplingParams
from qwen2.synth.records import SynthesisOutput, decontaminator, model_name

TESTS_PROMPT = ("Write {n} assert statements that check a correct implementation of `{entry_point}` described "
                "below, on typical and edge-case inputs. Reply with one ```python block holding only the assert "
                "lines, each calling {entry_point} directly.\n```python\n{prompt}\n```")


@dataclass(frozen=True)
class CodeSynthesis:
    problems: str = "humaneval:train"
    k: int = 4
    tests_per_problem: int = 2  # model-written suites, for problems without tests
    asserts_per_suite: int = 5
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 512
    seed: int = 0
    keep: int = 1  # passing solutions kept per problem
    pairs: int = 1
    timeout: float = 10.0
    decontaminate: tuple[str, ...] = ("humaneval:test",)

    def __post_init__(self) -> None:
        for name in ("k", "tests_per_problem", "asserts_per_suite", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"code synthesis: {name} must be at least 1 (got {getattr(self, name)})")
        if self.problems in self.decontaminate:
            raise ValueError(f"code synthesis: the problems {self.problems!r} are also an evaluation set to "
                             "decontaminate against; synthesise on humaneval:train, evaluate on humaneval:test")


def suite_from_reply(reply: str, entry_point: str, limit: int) -> str | None:
    """A model-written suite as a HumanEval `check(candidate)`: its assert lines (at most `limit`,
    single-line ones only), calling the candidate; None if it wrote none."""
    code = extract_code(reply, entry_point)
    asserts = [line.strip() for line in code.splitlines()
               if line.strip().startswith("assert ") and entry_point in line and line.count("(") == line.count(")")]
    if not asserts:
        return None
    body = "".join(f"    {line}\n" for line in asserts[:limit])
    return f"def check(candidate):\n    {entry_point} = candidate\n{body}"


def agreement(passes: list[frozenset[int]]) -> set[int]:
    """Indices of the solutions in the best group (same suites passed; score = size x suites);
    empty if the best group passes no suite."""
    groups: dict[frozenset[int], list[int]] = {}
    for i, passed in enumerate(passes):
        groups.setdefault(passed, []).append(i)
    best = max(groups.items(), key=lambda g: (len(g[1]) * len(g[0]), len(g[0]), -min(g[1])))
    return set(best[1]) if best[0] else set()


def execution_feedback(pretrained, sandbox, spec: CodeSynthesis, *, progress: bool = True,
                       limit: int | None = None) -> SynthesisOutput:
    """One synthesis round over the spec's problems (the first `limit` of them, if given)."""
    problems = load_code_problems(spec.problems)[:limit]
    checker = decontaminator(spec.decontaminate)
    params = SamplingParams(temperature=spec.temperature, top_p=spec.top_p, max_new_tokens=spec.max_new_tokens)
    source = model_name(pretrained)
    untested = [p for p in problems if not p.test.strip()]
    suites: dict[str, list[str]] = {}
    if untested:
        prompts = [[{"role": "user", "content": TESTS_PROMPT.format(n=spec.asserts_per_suite, entry_point=p.entry_point,
                                                                     prompt=p.prompt.strip())}] for p in untested]
        written = sample_chats(pretrained, prompts, k=spec.tests_per_problem, params=params, seed=spec.seed + 1,
                               progress=progress, description="tests")
        for problem, replies in zip(untested, written):
            suites[problem.task_id] = [s for r in replies if (s := suite_from_reply(r.text, problem.entry_point,
                                                                              spec.asserts_per_suite))]
    samples = sample_chats(pretrained, [p.messages() for p in problems], k=spec.k, params=params, seed=spec.seed,
                           progress=progress, description="solutions")
    out = SynthesisOutput()
    counts = {"passed": 0, "failed": 0, "kept": 0, "dropped_duplicate": 0, "dropped_contaminated": 0,
              "no_tests": 0}
    verdicts: dict[str, int] = {}
    for problem, drawn in zip(problems, samples):
        codes = [extract_code(s.text, problem.entry_point) for s in drawn]
        if problem.test.strip():
            results = [[run_solution(sandbox, problem, code)] for code in codes]
            good = {i for i, r in enumerate(results) if r[0].passed}
            how = "tests"
        else:
            own = suites.get(problem.task_id, [])
            if not own:
                counts["no_tests"] += 1
            results = [[run_solution(sandbox, _with_test(problem, suite), code) for suite in own] for code in codes]
            good = agreement([frozenset(j for j, r in enumerate(rs) if r.passed) for rs in results]) if own else set()
            how = "model-written tests"
        metas = []
        for i, (sample, rs) in enumerate(zip(drawn, results)):
            for r in rs:
                verdicts[r.verdict] = verdicts.get(r.verdict, 0) + 1
            meta = {"method": "code-execution-feedback", "model": source, "task_id": problem.task_id, "judged_by": how,
                    "verdict": "passed" if i in good else "failed", "runs": [f"{r.verdict}: {r.detail}" for r in rs],
                    "seed": sample.seed, "sample": i, "finish_reason": sample.finish_reason}
            counts["passed" if i in good else "failed"] += 1
            out.samples.append({"prompt": problem.messages(), "response": sample.text, "meta": meta})
            metas.append(meta)
        kept, seen = [], set()
        for i in sorted(good, key=lambda i: len(codes[i])):  # shortest passing code first
            if codes[i] in seen:
                counts["dropped_duplicate"] += 1
                continue
            seen.add(codes[i])
            if checker is not None and (hit := checker.check(problem.prompt + codes[i])) is not None:
                counts["dropped_contaminated"] += 1
                metas[i]["contaminates"] = hit.item
                continue
            kept.append(i)
        for i in kept[:spec.keep]:
            counts["kept"] += 1
            out.conversations.append({"messages": problem.messages() + [{"role": "assistant", "content": drawn[i].text}],
                                      "meta": metas[i]})
        failing = [i for i in range(len(drawn)) if i not in good]
        for i, j in list(zip(kept, failing))[:spec.pairs]:
            out.preferences.append({
                "prompt": problem.messages(), "chosen": [{"role": "assistant", "content": drawn[i].text}],
                "rejected": [{"role": "assistant", "content": drawn[j].text}],
                "meta": {"method": "code-execution-feedback", "model": source, "task_id": problem.task_id,
                         "chosen": {"seed": drawn[i].seed, "runs": metas[i]["runs"]},
                         "rejected": {"seed": drawn[j].seed, "runs": metas[j]["runs"]}}})
    solved = len({c["meta"]["task_id"] for c in out.conversations})
    out.summary = {"method": "code-execution-feedback", "model": source, "problems": len(problems),
                   "with_tests": len(problems) - len(untested), "without_tests": len(untested),
                   "samples": len(problems) * spec.k, "sandbox_verdicts": verdicts, **counts,
                   "problems_solved": solved, "preference_pairs": len(out.preferences),
                   "settings": {**spec.__dict__, "decontaminate": list(spec.decontaminate)}}
    if progress:
        print(f"code: {counts['passed']} of {len(problems) * spec.k} samples pass; kept {counts['kept']}, dropped "
              f"{counts['dropped_duplicate']} duplicates and {counts['dropped_contaminated']} contaminated",
              file=sys.stderr)
    return out


def _with_test(problem: CodeProblem, suite: str) -> CodeProblem:
    return CodeProblem(problem.task_id, problem.prompt, problem.entry_point, suite, problem.canonical_solution)

