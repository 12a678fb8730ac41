"""Repurposing (speeches parsed, instructions filtered by rules and by back-translation gain,
role-play conversations built from real replies) and constitutional feedback (revisions kept only
when changed, finished and preferred by the judge in both orders)."""

from __future__ import annotations

import dataclasses
import math

import pytest

import qwen2.synth.constitutional as constitutional
import qwen2.synth.repurpose as repurpose_module
from qwen2.checkpoint.loader import Pretrained
from qwen2.config import PRESETS
from qwen2.inference.batch import Sample
from qwen2.model import Qwen2ForCausalLM
from qwen2.synth.constitutional import ConstitutionalFeedback, clean_revision, constitutional_feedback, load_principles
from qwen2.synth.repurpose import Repurposing, clean_instruction, instruction_problems, play_speeches, repurpose
from qwen2.tomlspec import RecipeError

PLAY = """THE TRAGEDY OF TESTING

by William Shakespeare

ACT I. SCENE I. A room.

[Enter ALPHA and BETA.]

ALPHA.
Good morrow, friend, what news upon the road?
The sun is up and all the birds are singing,
And yet you look as though you bore a load
Of heavy tidings that the wind is bringing.

BETA.
No news, good Alpha, save that all is well:
The king is hale, the harvest in the barn,
[Aside.] Though what I know I dare not tell,
The river high, the sheep are in their yarn.

FIRST CITIZEN.
Peace!
"""


@pytest.fixture
def tiny(byte_tokenizer):
    config = dataclasses.replace(PRESETS["tiny"], vocab_size=260, eos_token_id=258)
    model = Qwen2ForCausalLM(config)
    model.init_weights(seed=0)
    return Pretrained(model.eval(), byte_tokenizer, {}, "tiny-stand-in")


def fake_sampler(reply_for):
    def sample_chats(pretrained, conversations, *, k, params, seed=0, progress=True, description=""):
        return [[Sample(*reply_for(c[-1]["content"]), 10, seed + i)] for i, c in enumerate(conversations)]
    return sample_chats


def test_speeches_are_parsed_with_their_cues():
    speeches = play_speeches("testing", PLAY)
    assert [s.speaker for s in speeches] == ["Alpha", "Beta", "First Citizen"]
    assert speeches[0].title == "The Tragedy Of Testing"
    assert speeches[1].text.count("\n") == 2 and "[Aside" not in speeches[1].text  # the stage direction is gone
    assert speeches[1].cue.speaker == "Alpha" and speeches[1].cue.text == speeches[0].text
    assert speeches[0].cue is None
    later = play_speeches("t", PLAY + "\nSCENE II. Another room.\n\nBETA.\nA new scene, a new start.\n\n"
                                      "BETA.\nAnd I go on speaking.\n")
    assert later[-2].cue is None  # a scene heading ends the exchange
    assert later[-1].cue is None  # a speaker does not cue themselves


@pytest.mark.parametrize("instruction,problems", [
    ("Describe a messenger who hides bad news behind cheerful words.", []),
    ("Hi", ["length 1 words"]),
    ("Here is an instruction: describe the morning in verse.", ["boilerplate"]),
    ("Write about how the sun is up and all the birds are singing today.", ["copies the passage"]),
])
def test_instruction_rules(instruction, problems):
    assert instruction_problems(instruction, PLAY) == problems


def test_clean_instruction():
    assert clean_instruction('Instruction: "Greet a friend in verse."\nMore text') == "Greet a friend in verse."
    assert clean_instruction("**Question:** Why is Beta silent?") == "Why is Beta silent?"


def test_instructions_are_kept_by_rules_and_by_backtranslation_gain(monkeypatch, tiny):
    speeches = play_speeches("testing", PLAY)[:2]
    replies = {"Alpha": "Greet a friend and ask why they look so troubled.", "Beta": "Hi"}
    monkeypatch.setattr(repurpose_module, "sample_chats",
                        fake_sampler(lambda text: (replies["Alpha" if "by Alpha" in text else "Beta"], "stop")))
    everything = repurpose(tiny, speeches, Repurposing(passages=2, min_lines=1, min_gain=-math.inf), progress=False)
    assert everything.summary["kept"] == 1 and everything.summary["drop_reasons"] == {"length": 1}
    kept = everything.conversations[0]["messages"]
    assert kept == [{"role": "user", "content": replies["Alpha"]}, {"role": "assistant", "content": speeches[0].text}]
    assert isinstance(everything.conversations[0]["meta"]["gain"], float)
    strict = repurpose(tiny, speeches, Repurposing(passages=2, min_lines=1, min_gain=math.inf), progress=False)
    assert strict.summary["kept"] == 0 and strict.summary["drop_reasons"] == {"length": 1, "gain": 1}


def test_roleplay_conversations_answer_the_cue_with_the_real_reply(monkeypatch, tiny):
    lines = "\n".join(f"Line {i} of a speech in verse that goes on." for i in range(4))
    text = "PLAY\n\n" + "".join(f"{'KING' if i % 2 else 'FOOL'}.\n{lines} ({i})\n\n" for i in range(14))
    speeches = play_speeches("p", text)
    profile = "The Fool is the king's jester, who mocks him in riddles and songs while loyally following him."
    monkeypatch.setattr(repurpose_module, "sample_chats", fake_sampler(lambda text: (profile, "stop")))
    out = repurpose(tiny, speeches, Repurposing(mode="roleplay", passages=4, characters=2, min_lines=1), progress=False)
    assert out.summary["profiles_kept"] == 2 and len(out.conversations) == 4
    system, user, assistant = out.conversations[0]["messages"]
    assert profile in system["content"] and system["content"].startswith("You are ")
    speaker = out.conversations[0]["meta"]["speaker"]
    reply = next(s for s in speeches if s.text == assistant["content"])
    assert reply.speaker == speaker and user["content"] == f"{reply.cue.speaker}: {reply.cue.text}"


def test_principles_file_is_checked(tmp_path):
    good = tmp_path / "c.toml"
    good.write_text('[[principle]]\nname = "brief"\ncritique = "Is it short?"\nrevision = "Make it short."\n')
    assert load_principles(good)[0].name == "brief"
    bad = tmp_path / "bad.toml"
    bad.write_text('[[principle]]\nname = "brief"\ncritique = ""\nrevision = "x"\n')
    with pytest.raises(RecipeError, match="principle 1"):
        load_principles(bad)
    (tmp_path / "none.toml").write_text('name = "x"\n')
    with pytest.raises(RecipeError, match="principle"):
        load_principles(tmp_path / "none.toml")


def test_clean_revision():
    assert clean_revision("Here is the revised response:\n\nShort answer.") == "Short answer."
    assert clean_revision('"Quoted answer."') == "Quoted answer."


def test_constitutional_feedback_keeps_changed_finished_judged_revisions(monkeypatch, tiny):
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(4)]
    original = {f"question {i}": f"original answer number {i}" for i in range(4)}
    revised = {0: "a better answer number zero", 1: "original answer number 1", 2: "", 3: "a better answer three"}

    def reply(text):
        if text in original:
            return original[text], "stop"
        if text.startswith("Here is a request"):
            return "It could be clearer.", "stop"
        i = int(text.split("question ")[1][0])
        return revised[i], "stop"

    monkeypatch.setattr(constitutional, "sample_chats", fake_sampler(reply))
    def judge(pretrained, texts):
        """Prompt 0's revision wins in both orders; prompt 3's only when shown first (position bias)."""
        scores = []
        for text in texts:
            a, b = text.split("Response A:")[1].split("Response B:")
            scores.append(1.0 if ("zero" in a or "three" in a) else -1.0 if "zero" in b else 0.5)
        return scores

    monkeypatch.setattr(constitutional, "prefers_first", judge)
    principles = load_principles(_defaults())
    out = constitutional_feedback(tiny, prompts, principles, ConstitutionalFeedback(), progress=False)
    assert len(out.preferences) == 1 and out.preferences[0]["chosen"][0]["content"] == revised[0]
    assert out.preferences[0]["rejected"][0]["content"] == original["question 0"]
    assert out.summary["drop_reasons"] == {"unchanged": 1, "empty revision": 1,
                                           "judge does not prefer the revision in both orders": 1}
    unjudged = constitutional_feedback(tiny, prompts, principles, ConstitutionalFeedback(judge=False), progress=False)
    assert len(unjudged.preferences) == 2


def _defaults():
    from qwen2.synth.commands import DEFAULTS

    return DEFAULTS / "constitution.toml"


def test_the_judge_reads_a_and_b_from_the_model(tiny):
    scores = constitutional.prefers_first(tiny, ["Which? A or B", "Another: A or B"])
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores)


def test_outputs_containing_an_evaluation_item_are_dropped():
    from qwen2.eval.humaneval import load_humaneval
    from qwen2.synth.records import SynthesisOutput, drop_contaminated

    leaked = load_humaneval()[5]
    out = SynthesisOutput(
        conversations=[{"messages": [{"role": "user", "content": "write it"},
                                     {"role": "assistant", "content": leaked.prompt + leaked.canonical_solution}],
                        "meta": {}},
                       {"messages": [{"role": "user", "content": "a poem"}, {"role": "assistant", "content": "roses"}]}],
        preferences=[{"prompt": [{"role": "user", "content": "x"}],
                      "chosen": [{"role": "assistant", "content": leaked.prompt + leaked.canonical_solution}],
                      "rejected": [{"role": "assistant", "content": "no"}], "meta": {}}])
    assert drop_contaminated(out, ("humaneval",)) == 2
    assert len(out.conversations) == 1 and out.preferences == [] and out.summary["dropped_contaminated"] == 2
