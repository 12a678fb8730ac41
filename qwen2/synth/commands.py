"""The `qwen2 synth ...` verbs and `qwen2 eval maths` (the argparse side; cli.py mounts them)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

from qwen2.eval.maths import KINDS

DEFAULTS = Path(__file__).with_name("defaults")  # the example constitution and prompts shipped in the package


def add_synth_parser(sub, add_model_args: Callable, load: Callable) -> None:
    p = sub.add_parser("synth", help="post-training data synthesis: maths rejection sampling, code execution "
                                     "feedback, repurposing, constitutional feedback; the sandbox")
    ssub = p.add_subparsers(dest="synth_verb", required=True)

    m = ssub.add_parser("math", help="maths rejection sampling: k solutions per generated problem, keep the right ones")
    add_model_args(m)
    m.add_argument("--out", required=True, help="conversations JSONL (pairs, sample log and summary beside it)")
    m.add_argument("--problems", type=int, default=200, help="generated problems to sample")
    m.add_argument("--k", type=int, default=4, help="samples per problem")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--temperature", type=float, default=0.7)
    m.add_argument("--top-p", type=float, default=0.95)
    m.add_argument("--max-new-tokens", type=int, default=512)
    m.add_argument("--keep", type=int, default=2, help="right solutions kept per problem")
    m.add_argument("--kinds", default=",".join(KINDS), help="comma-separated problem kinds: " + ", ".join(KINDS))
    m.set_defaults(func=lambda args: cmd_synth_math(args, load))

    c = ssub.add_parser("code", help="execution feedback: k solutions per problem run in the sandbox, passing ones kept")
    add_model_args(c)
    c.add_argument("--out", required=True, help="conversations JSONL (pairs, sample log and summary beside it)")
    c.add_argument("--problems", default="humaneval:train",
                   help="humaneval:train (default), or a JSONL file of HumanEval-format problems (without "
                        "\"test\": the model writes the tests)")
    c.add_argument("--limit", type=_at_least_one, default=None, help="only the first N problems")
    c.add_argument("--k", type=int, default=4, help="solutions per problem")
    c.add_argument("--tests-per-problem", type=int, default=2, help="model-written test suites (untested problems)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--temperature", type=float, default=0.8)
    c.add_argument("--top-p", type=float, default=0.95)
    c.add_argument("--max-new-tokens", type=int, default=512)
    c.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds per program")
    c.add_argument("--decontaminate", default="humaneval:test",
                   help="comma-separated evaluation sets (humaneval, humaneval:test, or JSONL files); '' for none")
    c.set_defaults(func=lambda args: cmd_synth_code(args, load))

    r = ssub.add_parser("repurpose", help="literature -> instructions: Shakespeare's speeches as the responses")
    add_model_args(r)
    r.add_argument("--out", required=True, help="conversations JSONL (sample log and summary beside it)")
    r.add_argument("--mode", choices=["instruction", "roleplay"], default="instruction",
                   help="instruction: the model writes the request a speech answers; roleplay: character profiles, "
                        "cue -> real reply")
    r.add_argument("--passages", type=int, default=100, help="speeches drawn (roleplay: conversations at most)")
    r.add_argument("--characters", type=int, default=10, help="roleplay: characters profiled")
    r.add_argument("--min-gain", type=float, default=0.05,
                   help="nats per passage token a written instruction must add over a generic request")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--temperature", type=float, default=0.7)
    _add_decontaminate(r)
    r.set_defaults(func=lambda args: cmd_synth_repurpose(args, load))

    k = ssub.add_parser("constitutional", help="answer, critique against a principle, revise; revised > original")
    add_model_args(k)
    k.add_argument("--out", required=True, help="conversations JSONL (pairs, sample log and summary beside it)")
    k.add_argument("--prompts", default=str(DEFAULTS / "prompts.jsonl"),
                   help="JSONL of {\"messages\": [...]} ending with a user turn")
    k.add_argument("--principles", default=str(DEFAULTS / "constitution.toml"),
                   help="TOML of [[principle]] name / critique / revision")
    k.add_argument("--limit", type=_at_least_one, default=None, help="only the first N prompts")
    k.add_argument("--no-judge", action="store_true", help="keep revisions without the model's two-order check")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--temperature", type=float, default=0.7)
    k.add_argument("--max-new-tokens", type=int, default=384)
    _add_decontaminate(k)
    k.set_defaults(func=lambda args: cmd_synth_constitutional(args, load))

    s = ssub.add_parser("sandbox", help="show the sandbox's isolation layers here, or run a Python file in it")
    s.add_argument("file", nargs="?", help="a Python file to run in the sandbox")
    s.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds")
    s.add_argument("--memory-mb", type=int, default=1024)
    s.set_defaults(func=cmd_synth_sandbox)


def add_eval_maths_parser(esub, add_model_args: Callable, load: Callable) -> None:
    from qwen2.synth.maths import HELD_OUT_SEED

    e = esub.add_parser("maths", help="exact-match accuracy on generated maths problems (greedy)")
    add_model_args(e)
    e.add_argument("--problems", type=int, default=300)
    e.add_argument("--seed", type=int, default=HELD_OUT_SEED, help=f"problem set (default: the held-out set, {HELD_OUT_SEED})")
    e.add_argument("--kinds", default=",".join(KINDS))
    e.add_argument("--max-new-tokens", type=int, default=512)
    e.add_argument("--out", default=None, help="JSON file for the scores and per-problem records")
    e.set_defaults(func=lambda args: cmd_eval_maths(args, load))

    h = esub.add_parser("humaneval", help="HumanEval pass@k, every program run in the sandbox")
    add_model_args(h)
    h.add_argument("--problems", default="humaneval",
                   help="humaneval, humaneval:test / humaneval:train (odd / even task numbers), or a JSONL file")
    h.add_argument("--limit", type=_at_least_one, default=None, help="only the first N problems")
    h.add_argument("--samples", type=int, default=1, help="samples per problem (1 = greedy pass@1)")
    h.add_argument("--temperature", type=float, default=None, help="default: 0 for one sample, else 0.8")
    h.add_argument("--max-new-tokens", type=int, default=512)
    h.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds per program")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--out", default=None, help="JSON file for the scores and per-problem records")
    h.set_defaults(func=lambda args: cmd_eval_humaneval(args, load))


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _probed_sandbox(timeout: float):
    """A sandbox for programs with `timeout` wall-clock seconds, probed now: a machine where it
    cannot run fails before the model is loaded, not after every reply is generated."""
    from qwen2.synth.sandbox import Limits, Sandbox

    sandbox = Sandbox(Limits(wall_seconds=timeout, cpu_seconds=max(1, math.ceil(timeout))))
    sandbox.layers  # noqa: B018
    return sandbox


def _sources(text: str) -> tuple[str, ...]:
    return tuple(d.strip() for d in text.split(",") if d.strip())


def _add_decontaminate(p) -> None:
    p.add_argument("--decontaminate", default="humaneval",
                   help="comma-separated evaluation sets to drop outputs that contain (humaneval, humaneval:test, "
                        "or JSONL files in HumanEval's format); '' for none")


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"--kinds: unknown {unknown}; choose from {', '.join(KINDS)}")
    return kinds


def cmd_synth_math(args: argparse.Namespace, load: Callable) -> int:
    from qwen2.synth.maths import MathsSynthesis, rejection_sample
    from qwen2.synth.records import write_output

    spec = MathsSynthesis(problems=args.problems, seed=args.seed, k=args.k, temperature=args.temperature,
                          top_p=args.top_p, max_new_tokens=args.max_new_tokens, keep=args.keep, kinds=_kinds(args.kinds))
    pretrained = load(args)
    started = time.perf_counter()
    result = rejection_sample(pretrained, spec, progress=True)
    paths = write_output(result, args.out)
    s = result.summary
    print(f"{s['problems']} problems x {spec.k} samples in {time.perf_counter() - started:.0f} s: "
          f"{s['verdicts'].get('correct', 0)} right ({s['sample_accuracy']:.1%}), verdicts {s['verdicts']}; "
          f"{s['problems_solved']} problems solved; kept {s['kept_conversations']} conversations -> {paths['conversations']}, "
          f"{s['preference_pairs']} pairs -> {paths['preferences']}", file=sys.stderr)
    return 0


def cmd_synth_code(args: argparse.Namespace, load: Callable) -> int:
    from qwen2.synth.code import CodeSynthesis, execution_feedback
    from qwen2.synth.records import write_output

    spec = CodeSynthesis(problems=args.problems, k=args.k, tests_per_problem=args.tests_per_problem,
                         temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                         seed=args.seed, timeout=args.timeout,
                         decontaminate=_sources(args.decontaminate))
    sandbox = _probed_sandbox(args.timeout)
    pretrained = load(args)
    started = time.perf_counter()
    result = execution_feedback(pretrained, sandbox, spec, progress=True, limit=args.limit)
    paths = write_output(result, args.out)
    s = result.summary
    print(f"{s['problems']} problems x {spec.k} solutions in {time.perf_counter() - started:.0f} s: {s['passed']} pass, "
          f"{s['failed']} fail (sandbox verdicts {s['sandbox_verdicts']}); kept {s['kept']} -> {paths['conversations']}, "
          f"dropped {s['dropped_duplicate']} duplicates, {s['dropped_contaminated']} contaminated; "
          f"{s['preference_pairs']} pairs -> {paths['preferences']}", file=sys.stderr)
    return 0


def cmd_synth_repurpose(args: argparse.Namespace, load: Callable) -> int:
    from qwen2.data.corpora import corpus_documents
    from qwen2.demo import cache_dir
    from qwen2.synth.records import drop_contaminated, write_output
    from qwen2.synth.repurpose import Repurposing, corpus_speeches, repurpose

    spec = Repurposing(mode=args.mode, passages=args.passages, characters=args.characters, min_gain=args.min_gain,
                       seed=args.seed, temperature=args.temperature)
    speeches = corpus_speeches(corpus_documents("shakespeare", cache_dir() / "corpora"))
    pretrained = load(args)
    started = time.perf_counter()
    result = repurpose(pretrained, speeches, spec, progress=True)
    drop_contaminated(result, _sources(args.decontaminate))
    paths = write_output(result, args.out)
    print(f"repurposing ({spec.mode}) in {time.perf_counter() - started:.0f} s: {json.dumps(result.summary['drop_reasons'])} "
          f"dropped; {len(result.conversations)} conversations -> {paths['conversations']}", file=sys.stderr)
    return 0


def cmd_synth_constitutional(args: argparse.Namespace, load: Callable) -> int:
    from qwen2.synth.constitutional import ConstitutionalFeedback, constitutional_feedback, load_principles
    from qwen2.synth.records import drop_contaminated, write_output
    from qwen2.train.online import load_prompts

    principles = load_principles(args.principles)
    prompts = [r["messages"] for r in load_prompts(Path(args.prompts), need_answer=False)][:args.limit]
    spec = ConstitutionalFeedback(seed=args.seed, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                  judge=not args.no_judge)
    pretrained = load(args)
    started = time.perf_counter()
    result = constitutional_feedback(pretrained, prompts, principles, spec, progress=True)
    drop_contaminated(result, _sources(args.decontaminate))
    paths = write_output(result, args.out)
    s = result.summary
    print(f"{s['prompts']} prompts in {time.perf_counter() - started:.0f} s: {s['kept_pairs']} revised > original "
          f"pairs -> {paths['preferences']}; dropped {s['dropped']} ({json.dumps(s['drop_reasons'])})", file=sys.stderr)
    return 0


def cmd_eval_maths(args: argparse.Namespace, load: Callable) -> int:
    from qwen2.atomic import atomic_write_text
    from qwen2.eval.maths import evaluate, generate_problems

    if args.problems < 1:
        raise ValueError(f"--problems must be at least 1 (got {args.problems})")
    problems = generate_problems(args.problems, seed=args.seed, kinds=_kinds(args.kinds))
    pretrained = load(args)
    started = time.perf_counter()
    scores = evaluate(pretrained, problems, max_new_tokens=args.max_new_tokens, progress=True)
    for name, s in [("overall", scores["overall"])] + sorted(scores["by_kind"].items()):
        print(f"{name:11s} {s['correct']:4d}/{s['total']:<4d} = {s['accuracy']:.1%}  "
              f"(95% CI {s['ci95'][0]:.1%} - {s['ci95'][1]:.1%})")
    print(f"{len(problems)} problems (seed {args.seed}) in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if args.out:
        atomic_write_text(Path(args.out), json.dumps({**scores, "model": pretrained.source, "seed": args.seed},
                                                     indent=1, ensure_ascii=False) + "\n")
    return 0


def cmd_eval_humaneval(args: argparse.Namespace, load: Callable) -> int:
    from qwen2.atomic import atomic_write_text
    from qwen2.eval.humaneval import evaluate_humaneval, load_code_problems

    problems = load_code_problems(args.problems)[:args.limit]
    sandbox = _probed_sandbox(args.timeout)
    temperature = args.temperature if args.temperature is not None else (0.0 if args.samples == 1 else 0.8)
    pretrained = load(args)
    started = time.perf_counter()
    scores = evaluate_humaneval(pretrained, problems, sandbox, samples=args.samples, temperature=temperature,
                                max_new_tokens=args.max_new_tokens, seed=args.seed, progress=True)
    passes = ", ".join(f"{k} {v:.1%}" for k, v in scores.items() if k.startswith("pass@"))
    print(f"{args.problems} ({len(problems)} problems, {args.samples} sample(s) each): {passes}; verdicts {scores['verdicts']}")
    print(f"in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if args.out:
        atomic_write_text(Path(args.out), json.dumps({**scores, "model": pretrained.source}, indent=1,
                                                     ensure_ascii=False) + "\n")
    return 0


def cmd_synth_sandbox(args: argparse.Namespace) -> int:
    from qwen2.synth.sandbox import Limits, Sandbox

    box = Sandbox(Limits(wall_seconds=args.timeout, cpu_seconds=max(1, int(args.timeout)), memory_mb=args.memory_mb))
    if args.file is None:
        print("the sandbox on this machine:")
        for layer in box.layers:
            print("  " + layer)
        return 0
    try:
        program = Path(args.file).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{args.file}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    result = box.run(program)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    print(f"verdict: {result.verdict} ({result.detail}) in {result.seconds:.2f} s"
          + (", output truncated" if result.truncated else ""), file=sys.stderr)
    return 0 if result.passed else 1
