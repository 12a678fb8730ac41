"""Rejection sampling for maths (Qwen2 report §4.1): sample k chain-of-thought solutions per
problem, keep those whose final answer is right as SFT data, pair right with wrong as preferences.

A sample is right when its stated final answer (qwen2.eval.maths.extract_answer) equals the
problem's exact answer and it ended by itself (a reply cut at the token budget is not a finished
solution even if a number in it happens to match). Identical right solutions count once; at most
`keep` per problem are kept, the shortest first (the report keeps "reasonable" paths; among
right ones, the shortest wanders least). Each problem with both right and wrong samples gives
up to `pairs` pairs (right vs wrong, in sample order).

Problems that also appear in the held-out evaluation set (same question text) are dropped before
sampling: the evaluation set is generated from its own seed, so this is exact decontamination.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen2.eval.maths import Problem, extract_answer, generate_problems, parse_number
from qwen2.inference.sampling import SamplingParams
from qwen2.inference.batch import sample_chats
from qwen2.synth.records import SynthesisOutput, model_name

HELD_OUT_SEED = 1_000_000  # `qwen2 eval maths` draws its problems from this seed by default


@dataclass(frozen=True)
class MathsSynthesis:
    problems: int = 200
    seed: int = 0
    k: int = 4
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 512
    keep: int = 2  # right solutions kept per problem
    pairs: int = 1  # preference pairs per problem
    kinds: tuple[str, ...] = ("arithmetic", "word", "algebra")
    held_out: int = 1000  # problems of the held-out set (HELD_OUT_SEED) excluded from the training set

    def __post_init__(self) -> None:
        for name in ("problems", "k", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"maths synthesis: {name} must be at least 1 (got {getattr(self, name)})")
        if self.seed == HELD_OUT_SEED:
            raise ValueError(f"maths synthesis: seed {HELD_OUT_SEED} is the held-out evaluation set's")


def training_problems(spec: MathsSynthesis) -> tuple[list[Problem], int]:
    """The problems to sample, minus any whose question is in the held-out set; (problems, dropped)."""
    held_out = {p.question for p in generate_problems(spec.held_out, seed=HELD_OUT_SEED, kinds=spec.kinds)}
    kept, dropped = [], 0
    for problem in generate_problems(spec.problems + spec.held_out, seed=spec.seed, kinds=spec.kinds):
        if len(kept) == spec.problems:
            break
        if problem.question in held_out:
            dropped += 1
        else:
            kept.append(problem)
    return kept, dropped


def judge(text: str, finish_reason: str, answer) -> tuple[str, str | None]:
    """(verdict, extracted answer): correct, wrong, no_answer or truncated."""
    extracted = extract_answer(text)
    if finish_reason != "stop":
        return "truncated", extracted
    value = parse_number(extracted)
    if value is None:
        return "no_answer", extracted
    return ("correct" if value == answer else "wrong"), extracted


def rejection_sample(pretrained, spec: MathsSynthesis, *, progress: bool = True) -> SynthesisOutput:
    problems, dropped = training_problems(spec)
    params = SamplingParams(temperature=spec.temperature, top_p=spec.top_p, max_new_tokens=spec.max_new_tokens)
    samples = sample_chats(pretrained, [p.messages() for p in problems], k=spec.k, params=params, seed=spec.seed,
                           progress=progress, description="maths samples")
    source = model_name(pretrained)
    sampling = {"temperature": spec.temperature, "top_p": spec.top_p, "max_new_tokens": spec.max_new_tokens,
                "k": spec.k}
    out = SynthesisOutput()
    verdict_counts: dict[str, int] = {}
    solved = 0
    for problem, drawn in zip(problems, samples):
        judged = []
        for index, sample in enumerate(drawn):
            verdict, extracted = judge(sample.text, sample.finish_reason, problem.answer)
            verdict_counts[verdict] = verdict_counts.get(verdict, 0) + 1
            meta = {"method": "maths-rejection-sampling", "model": source, "problem_id": problem.id,
                    "kind": problem.kind, "answer": problem.answer_text, "extracted": extracted, "verdict": verdict,
                    "seed": sample.seed, "sample": index, "tokens": sample.tokens, "sampling": sampling}
            out.samples.append({"prompt": problem.messages(), "response": sample.text, "meta": meta})
            judged.append((verdict, sample, meta))
        unique: dict[str, tuple] = {}
        for verdict, sample, meta in judged:
            if verdict == "correct":
                unique.setdefault(sample.text, (sample, meta))  # the first of identical solutions
        right = sorted(unique.values(), key=lambda sm: len(sm[0].text))
        wrong = [(s, m) for v, s, m in judged if v != "correct"]
        solved += bool(right)
        for sample, meta in right[:spec.keep]:
            out.conversations.append({"messages": problem.messages() + [{"role": "assistant", "content": sample.text}],
                                      "meta": meta})
        for (good, good_meta), (bad, bad_meta) in list(zip(right, wrong))[:spec.pairs]:
            out.preferences.append({
                "prompt": problem.messages(), "chosen": [{"role": "assistant", "content": good.text}],
                "rejected": [{"role": "assistant", "content": bad.text}],
                "meta": {"method": "maths-rejection-sampling", "model": source, "problem_id": problem.id,
                         "answer": problem.answer_text, "chosen": {k: good_meta[k] for k in ("verdict", "seed", "extracted")},
                         "rejected": {k: bad_meta[k] for k in ("verdict", "seed", "extracted")}}})
    total = len(problems) * spec.k
    out.summary = {"method": "maths-rejection-sampling", "model": source, "problems": len(problems),
                   "held_out_excluded": dropped, "samples": total, "verdicts": verdict_counts,
                   "sample_accuracy": round(verdict_counts.get("correct", 0) / max(total, 1), 4),
                   "problems_solved": solved, "kept_conversations": len(out.conversations),
                   "preference_pairs": len(out.preferences), "settings": {**spec.__dict__, "kinds": list(spec.kinds)}}
    return out
