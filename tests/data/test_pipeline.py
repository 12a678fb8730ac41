"""The data pipeline end to end on small inputs: every kind of drop is recorded under its rule,
duplicates across units are removed, the token shards open with the tokenizer written beside
them, and a run killed midway (even inside a unit) and started again writes exactly the files of an
uninterrupted run; so does the Ray executor."""

import json

import pytest

from qwen2.data.decontam import humaneval_items
from qwen2.data.pipeline import load_pipeline_recipe, run_pipeline
from qwen2.data.readers import iter_documents
from qwen2.data.shards import TokenShard, find_shards
from qwen2.tomlspec import RecipeError


SPAM = " ".join(["buy cheap watches now"] * 40)


def _prose(seed):
    """A distinct page of plain English (sentences drawn from many subjects, verbs and objects)."""
    import random

    rng = random.Random(seed)
    who = ["the council", "a young engineer", "our neighbours", "the river pilots", "two sisters", "the old miller",
           "a travelling doctor", "the harbour master", "the village teacher", "a group of students", "the bakers",
           "the night watchman", "a retired captain", "the museum staff", "the valley farmers"]
    did = ["repaired", "described", "painted", "measured", "defended", "questioned", "rebuilt", "celebrated",
           "photographed", "explored", "catalogued", "inspected", "sold", "borrowed", "planted"]
    what = ["the stone bridge", "an abandoned mill", "the northern road", "a collection of maps", "the bell tower",
            "several fishing boats", "the church orchard", "a broken clock", "the flooded meadow",
            "an unusual letter", "the summer market", "the lighthouse lamp", "a box of seeds", "the town archive"]
    when = ["in 1851", "after winter", "during harvest", "before the storm", "on Sunday", "with care", "at dawn",
            "last autumn", "that evening", "in secret", "without help", "at noon"]
    return " ".join(f"{rng.choice(who).capitalize()} {rng.choice(did)} {rng.choice(what)} {rng.choice(when)}."
                    for _ in range(12))


def _inputs(root):
    prose = [_prose(seed) for seed in range(6)]
    rows = [{"id": f"p{i}", "text": t} for i, t in enumerate(prose)]
    rows.append({"id": "exact-copy", "text": prose[1].upper().replace(",", " ,")})  # case / punctuation only
    near = prose[2].split()
    near[10] = "CHANGED"
    rows.append({"id": "near-copy", "text": " ".join(near)})
    rows.append({"id": "spam", "text": SPAM})
    problem = humaneval_items()[7]
    rows.append({"id": "leak", "text": "Notes from my homework, solved:\n" + problem.text, "domain": "code"})
    a = root / "in" / "a.jsonl"
    a.parent.mkdir(parents=True)
    a.write_text("\n".join(json.dumps(r) for r in rows[:5]) + "\n{broken json\n", encoding="utf-8")
    (root / "in" / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows[5:]) + "\n", encoding="utf-8")


def _recipe(root, tokenizer_dir, executor="local", workers=1):
    text = f'''
name = "test"
[[input]]
name = "web"
paths = ["in"]
[[input]]
name = "code"
paths = ["{{stdlib}}/json"]
glob = "*.py"
domain = "code"
files_per_unit = 2
[dedup]
ngram = 3
threshold = 0.7
[pack]
tokenizer = "{tokenizer_dir}"
val_fraction = 0.2
[executor]
kind = "{executor}"
workers = {workers}
'''
    path = root / "recipe.toml"
    path.write_text(text, encoding="utf-8")
    return load_pipeline_recipe(path)


@pytest.fixture
def setup(tmp_path, byte_tokenizer):
    _inputs(tmp_path)
    byte_tokenizer.save(tmp_path / "tok")
    return tmp_path


def _files(folder):
    """Every output file's bytes (timings.json: seconds, the one thing that differs between runs)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "timings.json"}


def test_every_drop_is_recorded_and_the_shards_open(setup):
    summary = run_pipeline(_recipe(setup, setup / "tok"), setup / "out", progress=False)
    out = setup / "out"
    report = json.loads((out / "summary.json").read_text())
    assert report["rejected_lines"] == 1
    rejects = [json.loads(line) for p in out.glob("stage1/*/rejects.jsonl") for line in p.read_text().splitlines()]
    assert rejects[0]["where"].endswith("a.jsonl:6") and "not valid JSON" in rejects[0]["reason"]
    dropped = {json.loads(line)["id"]: json.loads(line)["rule"]
               for p in out.glob("stage1/*/dropped.jsonl") for line in p.read_text().splitlines()}
    assert dropped["spam"].startswith("gopher.") and dropped["leak"] == "decontam"
    assert report["dedup"]["exact_removed"] == 1 and report["dedup"]["near_removed"] == 1
    removed = json.loads((out / "dedup" / "removed.json").read_text())
    assert sorted(why.split(" of ")[0] for unit in removed.values() for why in unit.values()) == \
        ["exact duplicate", "near duplicate"]
    written = [d for path in sorted((out / "documents" / "web").glob("*.zst")) for d in iter_documents([path])]
    assert [d.id for d in written] == ["p0", "p1", "p2", "p3", "p4", "p5"] and written[0].lang == "en"
    assert summary.written == 6 + report["domains"]["code"]  # the six pages (copies gone), plus json/*.py
    from qwen2.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_dir(out / "tokenizer")
    shards = [TokenShard.open(p, fingerprint=tokenizer.fingerprint) for p in find_shards(out / "shards" / "train")]
    assert sum(s.num_tokens for s in shards) + sum(
        TokenShard.open(p).num_tokens for p in find_shards(out / "shards" / "val")) == sum(summary.tokens.values())
    assert (out / "report.md").read_text().count("| gopher.") >= 1


def test_a_killed_run_resumes_to_the_same_files(setup):
    recipe = _recipe(setup, setup / "tok")
    run_pipeline(recipe, setup / "whole", progress=False)
    assert run_pipeline(recipe, setup / "killed", progress=False, stop_after_units=2) is None
    # a unit killed while writing: outputs but no DONE marker
    partial = setup / "killed" / "stage1" / "00002-code"
    partial.mkdir(parents=True)
    (partial / "kept.jsonl.zst").write_bytes(b"half a file")
    run_pipeline(recipe, setup / "killed", progress=False)
    assert _files(setup / "killed") == _files(setup / "whole")
    # and a finished run, run again, changes nothing
    run_pipeline(recipe, setup / "killed", progress=False)
    assert _files(setup / "killed") == _files(setup / "whole")


def test_documents_can_be_written_as_parquet(setup):
    recipe = _recipe(setup, setup / "tok")
    text = (setup / "recipe.toml").read_text().replace("[pack]\n", '[pack]\ndocuments_format = "parquet"\n')
    (setup / "recipe.toml").write_text(text)
    run_pipeline(load_pipeline_recipe(setup / "recipe.toml"), setup / "pq", progress=False)
    run_pipeline(recipe, setup / "zst", progress=False)
    as_parquet = [d for p in sorted((setup / "pq" / "documents").rglob("*.parquet")) for d in iter_documents([p])]
    as_jsonl = [d for p in sorted((setup / "zst" / "documents").rglob("*.zst")) for d in iter_documents([p])]
    assert as_parquet == as_jsonl and len(as_parquet) > 5


def test_ray_writes_the_same_files_as_the_local_executor(setup):
    run_pipeline(_recipe(setup, setup / "tok", "local", 2), setup / "local", progress=False)
    run_pipeline(_recipe(setup, setup / "tok", "ray", 2), setup / "ray", progress=False)
    assert _files(setup / "ray") == _files(setup / "local")


def test_recipe_errors_name_the_key(tmp_path):
    (tmp_path / "r.toml").write_text('[[input]]\nname = "x"\npaths = ["a"]\n[dedup]\nthreshhold = 0.5\n')
    with pytest.raises(RecipeError, match=r"\[dedup\].*threshhold"):
        load_pipeline_recipe(tmp_path / "r.toml")
    (tmp_path / "r.toml").write_text('[[input]]\nname = "x"\n')
    with pytest.raises(RecipeError, match="paths or corpus"):
        load_pipeline_recipe(tmp_path / "r.toml")
    (tmp_path / "r.toml").write_text('[[input]]\nname = "x"\npaths = ["a"]\n[filters]\nfamilies = {web = ["c5"]}\n')
    with pytest.raises(RecipeError, match="families.web"):
        load_pipeline_recipe(tmp_path / "r.toml")
