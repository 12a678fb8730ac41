"""Synthesis and execution evaluation on the real demo model (small runs of the real thing)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from qwen2.eval.maths import generate_problems, is_correct
from qwen2.synth.maths import HELD_OUT_SEED


@pytest.fixture(scope="module")
def demo_bf16(demo_path):
    from qwen2.checkpoint import load_pretrained

    return load_pretrained(demo_path, dtype=torch.bfloat16)


def test_synth_math_keeps_only_verified_solutions(tmp_path, demo_path):
    out = tmp_path / "maths.jsonl"
    done = subprocess.run([sys.executable, "-m", "qwen2", "synth", "math", "--model", str(demo_path), "--dtype",
                           "bfloat16", "--problems", "4", "--k", "2", "--max-new-tokens", "320", "--kinds", "arithmetic",
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "maths.summary.json").read_text())
    samples = [json.loads(line) for line in (tmp_path / "maths.samples.jsonl").read_text().splitlines()]
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["samples"] == len(samples) == 8 and sum(summary["verdicts"].values()) == 8
    assert kept, "the 0.5B model solves none of 4 arithmetic problems in 2 tries"  # it solves most
    problems = {p.id: p for p in generate_problems(4, seed=0, kinds=("arithmetic",))}
    for conversation in kept:
        meta = conversation["meta"]
        assert is_correct(conversation["messages"][-1]["content"], problems[meta["problem_id"]].answer)
        assert meta["verdict"] == "correct" and meta["seed"] is not None and meta["model"].endswith(".gguf")
    held_out = {p.question for p in generate_problems(1000, seed=HELD_OUT_SEED, kinds=("arithmetic",))}
    assert not held_out & {c["messages"][1]["content"] for c in kept}


def test_humaneval_pass_at_1_through_the_sandbox(demo_bf16):
    from qwen2.eval.humaneval import evaluate_humaneval, load_humaneval
    from qwen2.synth.sandbox import Limits, Sandbox

    problems = load_humaneval()[:6]
    scores = evaluate_humaneval(demo_bf16, problems, Sandbox(Limits(wall_seconds=10, cpu_seconds=5)),
                                max_new_tokens=384, progress=False)
    assert scores["problems"] == 6 and sum(scores["verdicts"].values()) == 6
    assert scores["pass@1"] >= 2 / 6, scores["verdicts"]  # Qwen2.5-Coder-0.5B-Instruct solves most of these


def test_synth_code_runs_every_solution_in_the_sandbox(tmp_path, demo_path):
    out = tmp_path / "code.jsonl"
    done = subprocess.run([sys.executable, "-m", "qwen2", "synth", "code", "--model", str(demo_path), "--dtype",
                           "bfloat16", "--limit", "3", "--k", "2", "--max-new-tokens", "384", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "code.summary.json").read_text())
    samples = [json.loads(line) for line in (tmp_path / "code.samples.jsonl").read_text().splitlines()]
    assert summary["samples"] == len(samples) == 6 and summary["passed"] + summary["failed"] == 6
    assert sum(summary["sandbox_verdicts"].values()) == 6
    assert summary["passed"] >= 2, summary  # the coder model solves some of HumanEval/0, /2, /4
    assert summary["kept"] + summary["dropped_duplicate"] + summary["dropped_contaminated"] <= summary["passed"]
    assert all(s["meta"]["task_id"] in ("HumanEval/0", "HumanEval/2", "HumanEval/4") for s in samples)


def test_repurposing_turns_real_speeches_into_conversations(demo_bf16):
    from qwen2.data.corpora import corpus_documents
    from qwen2.demo import cache_dir
    from qwen2.synth.repurpose import Repurposing, corpus_speeches, repurpose

    speeches = corpus_speeches(corpus_documents("shakespeare", cache_dir() / "corpora"))
    assert len(speeches) > 20_000 and len({s.play for s in speeches}) >= 30
    out = repurpose(demo_bf16, speeches, Repurposing(passages=4, min_gain=0.0, seed=1), progress=False)
    texts = {s.text for s in speeches}
    assert out.summary["candidates"] == 4 and out.summary["kept"] + out.summary["dropped"] == 4
    for conversation in out.conversations:
        user, assistant = conversation["messages"]
        assert assistant["content"] in texts and user["content"] and user["content"] not in texts
        assert conversation["meta"]["gain"] >= 0.0


def test_synth_constitutional_on_the_demo_model(tmp_path, demo_path):
    out = tmp_path / "cai.jsonl"
    done = subprocess.run([sys.executable, "-m", "qwen2", "synth", "constitutional", "--model", str(demo_path),
                           "--dtype", "bfloat16", "--limit", "3", "--max-new-tokens", "160", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "cai.summary.json").read_text())
    samples = [json.loads(line) for line in (tmp_path / "cai.samples.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (tmp_path / "cai.preferences.jsonl").read_text().splitlines()]
    assert summary["prompts"] == len(samples) == 3 and summary["kept_pairs"] + summary["dropped"] == 3
    assert len(pairs) == summary["kept_pairs"]
    for s in samples:
        assert s["original"] and s["meta"]["critique"] and s["meta"]["principle"] in summary["principles"]
