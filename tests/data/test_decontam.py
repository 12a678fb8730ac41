"""Decontamination: a planted copy of a HumanEval problem is removed, real standard-library code
is kept, and the report's LCS rule keeps a document that shares only a stray n-gram."""

import inspect
import json

import pytest

from qwen2.data.decontam import Decontaminator, EvalItem, humaneval_items, jsonl_items
from qwen2.data.readers import DataError


@pytest.fixture(scope="module")
def humaneval():
    return Decontaminator(humaneval_items())


def test_a_planted_humaneval_problem_is_found(humaneval):
    problem = humaneval.items[42]
    assert len(humaneval.items) == 164
    # the solution pasted into an unrelated module, reformatted a little
    document = ("import os\n\n\ndef helper(path):\n    return os.path.basename(path)\n\n\n" +
                problem.text.replace("    ", "\t") + "\n\nif __name__ == '__main__':\n    print(helper('a/b'))\n")
    found = humaneval.check(document)
    assert found is not None and found.item == problem.id and found.lcs >= 13


def test_real_library_code_is_kept(humaneval):
    import json as json_module
    import textwrap as textwrap_module
    import csv
    for module in (json_module, textwrap_module, csv, inspect):
        assert humaneval.check(inspect.getsource(module)) is None, module.__name__


def test_the_lcs_rule_keeps_a_stray_shared_ngram():
    item = EvalItem("t1", "Write a function that returns the sum of the squares of all the odd numbers in the list. "
                          + " ".join(f"step{i} does something specific here" for i in range(40)))
    stray = ("An essay that happens to say: write a function that returns the sum of the squares of all the odd "
             "numbers in the list, and then talks about gardening for a long time. " + "Tomatoes need sun. " * 60)
    assert Decontaminator([item]).check(stray) is None                  # the report's rule: LCS too short
    assert Decontaminator([item], lcs_ratio=0).check(stray).item == "t1"  # GPT-3's rule: any 13-gram
    assert Decontaminator([item]).check("Preface. " + item.text.upper() + " The end.").item == "t1"


def test_jsonl_eval_sets(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"id": "q1", "question": "What is the capital of France and why was it chosen "
                                "as the seat of government in the middle ages?", "answer": "Paris."}) + "\n")
    items = jsonl_items(path, fields=("question", "answer"))
    assert items[0].id == "q1" and items[0].text.endswith("Paris.")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "q2", "question": 3}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:1"):
        jsonl_items(bad, fields=("question", "answer"))
    with pytest.raises(ValueError, match="lcs_ratio"):
        Decontaminator(items, lcs_ratio=2)
