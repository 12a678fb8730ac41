"""What every synthesis method writes: conversations, preference pairs, the full sample log.

Formats are DESIGN.md's: conversations `{"messages": [...]}` (SFT), preferences `{"prompt":
[...], "chosen": [...], "rejected": [...]}` (DPO, reward model); each record also carries `meta`
with its provenance (method, model, seed, verdicts), which the trainers ignore. For an output
`out.jsonl` the method writes:

    out.jsonl                  the kept conversations
    out.preferences.jsonl      the pairs
    out.samples.jsonl          every sample with its verdict (nothing is silently dropped)
    out.summary.json           counts and settings

All four are written atomically (temporary name, then rename) once the run is done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen2.atomic import atomic_write_text


@dataclass
class SynthesisOutput:
    conversations: list[dict] = field(default_factory=list)
    preferences: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def output_paths(out: str | Path) -> dict[str, Path]:
    out = Path(out)
    stem = out.name[:-len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return {"conversations": out, "preferences": out.with_name(stem + ".preferences.jsonl"),
            "samples": out.with_name(stem + ".samples.jsonl"), "summary": out.with_name(stem + ".summary.json")}


def write_output(result: SynthesisOutput, out: str | Path) -> dict[str, Path]:
    paths = output_paths(out)
    paths["conversations"].parent.mkdir(parents=True, exist_ok=True)
    for key in ("conversations", "preferences", "samples"):
        atomic_write_text(paths[key], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in getattr(result, key)))
    atomic_write_text(paths["summary"], json.dumps(result.summary, indent=1, ensure_ascii=False) + "\n")
    return paths


def model_name(pretrained) -> str:
    """A short, stable name of the generating model for provenance."""
    return str(getattr(pretrained, "source", "") or "unknown")


def decontaminator(sources: tuple[str, ...]):
    """The data pipeline's n-gram + LCS checker over evaluation sets ("humaneval", "humaneval:test",
    or JSONL files in HumanEval's format); None for no sets."""
    from qwen2.data.decontam import Decontaminator, EvalItem
    from qwen2.eval.humaneval import load_code_problems

    items = [EvalItem(p.task_id, p.text) for source in sources for p in load_code_problems(source)]
    return Decontaminator(items) if items else None


def drop_contaminated(result: SynthesisOutput, sources: tuple[str, ...]) -> int:
    """Remove the conversations and pairs whose text contains an item of the evaluation sets
    (`sources`: "humaneval", "humaneval:test", or JSONL files in HumanEval's format), by the data
    pipeline's 13-gram + LCS rule; each removal is marked in its sample's meta. Returns how many."""
    checker = decontaminator(sources)
    if checker is None:
        return 0

    def text_of(record: dict) -> str:
        turns = record.get("messages") or (record.get("prompt", []) + record.get("chosen", []) + record.get("rejected", []))
        return "\n".join(m["content"] for m in turns)

    dropped = 0
    for key in ("conversations", "preferences"):
        kept = []
        for record in getattr(result, key):
            hit = checker.check(text_of(record))
            if hit is None:
                kept.append(record)
                continue
            dropped += 1
            record.get("meta", {})["contaminates"] = hit.item
        setattr(result, key, kept)
    result.summary["dropped_contaminated"] = dropped
    return dropped
