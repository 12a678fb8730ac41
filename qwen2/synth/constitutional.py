"""Constitutional feedback (Qwen2 report §4.1; Bai et al. 2022): a file of principles; the model
answers, critiques its answer against a principle, and revises it; revised over original becomes
a preference pair and the revision an SFT conversation.

A revision is only trusted if the model, asked as a judge which of the two replies follows the
principle better, prefers it in both orders (A/B and B/A, read from the next-token probabilities
of "A" and "B", so position bias cannot decide). Pairs that fail the check, revisions that are
empty, identical to the original or wrapped in boilerplate are dropped and counted.

The principles file is TOML: one [[principle]] table per principle with `name`, `critique`
(what to look for) and `revision` (how to rewrite). qwen2/synth/defaults/constitution.toml is an
example (the default), with qwen2/synth/defaults/prompts.jsonl.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen2.inference.batch import sample_chats
from qwen2.inference.sampling import SamplingParams
from qwen2.synth.records import SynthesisOutput, model_name

CRITIQUE_PROMPT = ("Here is a request and a response to it.\n\nRequest:\n{request}\n\nResponse:\n{response}\n\n"
                   "Principle: {critique}\n\nPoint out, briefly and concretely, where the response falls short of "
                   "this principle. If it does not fall short, say so.")
REVISION_PROMPT = ("Request:\n{request}\n\nResponse:\n{response}\n\nCritique:\n{critique_text}\n\n{revision}\n\n"
                   "Reply with the rewritten response only.")
JUDGE_PROMPT = ("Principle: {critique}\n\nRequest:\n{request}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\n"
                "Which response follows the principle better? Answer with the single letter A or B.")
LEAD_IN = re.compile(r"^\s*(here is|here's|sure[,!.]|certainly[,!.]|revised response:|rewritten response:)[^\n]*\n+",
                     re.I)


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str
    revision: str


def load_principles(path: str | Path) -> list[Principle]:
    from qwen2.tomlspec import RecipeError, read_toml

    raw = read_toml(Path(path))
    items = raw.get("principle")
    if not isinstance(items, list) or not items:
        raise RecipeError(f"{path}: needs [[principle]] tables with name, critique and revision")
    principles = []
    for i, item in enumerate(items, 1):
        if not isinstance(item, dict) or set(item) != {"name", "critique", "revision"} or \
                not all(isinstance(v, str) and v.strip() for v in item.values()):
            raise RecipeError(f"{path}: principle {i} needs exactly name, critique and revision (non-empty strings)")
        principles.append(Principle(item["name"], item["critique"].strip(), item["revision"].strip()))
    return principles


@dataclass(frozen=True)
class ConstitutionalFeedback:
    seed: int = 0
    temperature: float = 0.7
    max_new_tokens: int = 384
    judge: bool = True  # keep a pair only if the model prefers the revision in both orders


def clean_revision(text: str) -> str:
    """The revision without a lead-in line ("Here is the revised response:") or surrounding quotes."""
    return LEAD_IN.sub("", text.strip(), count=1).strip().strip('"').strip()


@torch.no_grad()
def prefers_first(pretrained, prompts: list[str]) -> list[float]:
    """log P("A") - log P("B") as the judge's next token after each prompt (positive: A)."""
    from qwen2.tokenizer import encode_chat

    tokenizer, model = pretrained.tokenizer, pretrained.model
    a, b = tokenizer.encode("A"), tokenizer.encode("B")
    if len(a) != 1 or len(b) != 1:
        raise ValueError("the judge needs 'A' and 'B' to be single tokens")
    out = []
    for prompt in prompts:
        ids = encode_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
        logits = model(torch.tensor([ids]), logits_to_keep=1)[0, -1].float()
        out.append(float(torch.log_softmax(logits, -1)[a[0]] - torch.log_softmax(logits, -1)[b[0]]))
    return out


def constitutional_feedback(pretrained, prompts: list[list[dict]], principles: list[Principle],
                            spec: ConstitutionalFeedback, *, progress: bool = True) -> SynthesisOutput:
    """One round over `prompts` (message lists ending with a user turn), a principle drawn per prompt."""
    rng = random.Random(spec.seed)
    chosen = [principles[rng.randrange(len(principles))] for _ in prompts]
    params = SamplingParams(temperature=spec.temperature, top_p=0.95, max_new_tokens=spec.max_new_tokens)

    def ask(texts: list[str], what: str, offset: int) -> list:
        return [r[0] for r in sample_chats(pretrained, [[{"role": "user", "content": t}] for t in texts], k=1,
                                           params=params, seed=spec.seed + offset, progress=progress, description=what)]

    originals = [r[0] for r in sample_chats(pretrained, prompts, k=1, params=params, seed=spec.seed, progress=progress,
                                            description="answers")]
    requests = [p[-1]["content"] for p in prompts]
    critiques = ask([CRITIQUE_PROMPT.format(request=q, response=o.text, critique=c.critique)
                     for q, o, c in zip(requests, originals, chosen)], "critiques", 1)
    revisions = ask([REVISION_PROMPT.format(request=q, response=o.text, critique_text=k.text, revision=c.revision)
                     for q, o, k, c in zip(requests, originals, critiques, chosen)], "revisions", 2)
    revised = [clean_revision(r.text) for r in revisions]
    verdicts: list[list[str]] = []
    for o, r, rev in zip(originals, revisions, revised):
        why = []
        if not rev or len(rev.split()) < 3:
            why.append("empty revision")
        elif rev.strip() == o.text.strip():
            why.append("unchanged")
        if r.finish_reason != "stop" or o.finish_reason != "stop":
            why.append("cut at the token budget")
        verdicts.append(why)
    judged = [i for i, why in enumerate(verdicts) if not why]
    if spec.judge and judged:
        forward = prefers_first(pretrained, [JUDGE_PROMPT.format(critique=chosen[i].critique, request=requests[i],
                                                                 a=revised[i], b=originals[i].text) for i in judged])
        backward = prefers_first(pretrained, [JUDGE_PROMPT.format(critique=chosen[i].critique, request=requests[i],
                                                                  a=originals[i].text, b=revised[i]) for i in judged])
        for i, f, b in zip(judged, forward, backward):
            if not (f > 0 and b < 0):
                verdicts[i].append(f"judge does not prefer the revision in both orders ({f:+.2f}, {-b:+.2f})")
    source = model_name(pretrained)
    out = SynthesisOutput()
    for i, prompt in enumerate(prompts):
        meta = {"method": "constitutional-feedback", "model": source, "principle": chosen[i].name,
                "critique": critiques[i].text, "seeds": [originals[i].seed, critiques[i].seed, revisions[i].seed],
                "dropped": verdicts[i]}
        out.samples.append({"prompt": prompt, "original": originals[i].text, "revision": revised[i], "meta": meta})
        if verdicts[i]:
            continue
        out.conversations.append({"messages": prompt + [{"role": "assistant", "content": revised[i]}], "meta": meta})
        out.preferences.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": revised[i]}],
                                "rejected": [{"role": "assistant", "content": originals[i].text}], "meta": meta})
    reasons: dict[str, int] = {}
    for why in verdicts:
        for w in why:
            key = w.split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
    out.summary = {"method": "constitutional-feedback", "model": source, "prompts": len(prompts),
                   "kept_pairs": len(out.preferences), "dropped": sum(bool(w) for w in verdicts),
                   "drop_reasons": reasons, "principles": [p.name for p in principles],
                   "settings": dict(spec.__dict__)}
    return out
