"""Mixture search: proxies trained on candidate mixtures are ranked by held-out loss per domain,
and a training recipe takes the chosen weights from mixture.json."""

import json
import random

import pytest

from qwen2.data.mixture import load_mixture_recipe, run_mixture_search, simplex_grid
from qwen2.data.shards import ShardWriter, document_end_id
from qwen2.tomlspec import RecipeError


def test_simplex_grid():
    grid = simplex_grid(["a", "b", "c"], 0.25)
    assert len(grid) == 3 and all(abs(sum(m.values()) - 1) < 1e-9 and min(m.values()) > 0 for m in grid)
    assert len(simplex_grid(["a", "b"], 0.1)) == 9


def _shards(root, tokenizer):
    rng = random.Random(0)
    texts = {"prose": lambda: " ".join(rng.choice(["the cat sat on the mat.", "a dog ran in the park.",
                                                   "we walked home slowly."]) for _ in range(40)),
             "digits": lambda: " ".join(str(rng.randrange(10 ** 6)) for _ in range(60))}
    end = document_end_id(tokenizer)
    for domain, make in texts.items():
        for split, n in (("train", 60), ("val", 8)):
            writer = ShardWriter(root / "shards" / split, f"{domain}-00000", tokenizer.fingerprint,
                                 tokenizer.vocab_size, end)
            for _ in range(n):
                writer.add(tokenizer.encode(make()))
            writer.flush()


def test_search_ranks_mixtures_and_a_recipe_uses_the_choice(tmp_path, byte_tokenizer):
    byte_tokenizer.save(tmp_path / "tok")
    _shards(tmp_path, byte_tokenizer)
    (tmp_path / "mix.toml").write_text('''
shards = "shards"
tokenizer = "tok"
candidates = [{prose = 0.9, digits = 0.1}, {prose = 0.1, digits = 0.9}]
objective = {prose = 1.0, digits = 0.0}
steps = 25
seq_len = 64
''')
    result = run_mixture_search(load_mixture_recipe(tmp_path / "mix.toml"), tmp_path / "out", progress=False)
    first, second = result["results"]
    # a proxy that saw more prose predicts held-out prose better, and the objective counts only prose
    assert first["held_out"]["prose"] < second["held_out"]["prose"]
    assert result["weights"] == pytest.approx({"prose": 0.9, "digits": 0.1})
    chosen = json.loads((tmp_path / "out" / "mixture.json").read_text())
    assert chosen["weights"] == result["weights"] and len(chosen["candidates"]) == 2

    from qwen2.train.recipe import load_recipe
    (tmp_path / "train.toml").write_text('''
[model]
preset = "tiny"
[tokenizer]
path = "tok"
[data]
sources = { prose = "shards/train/prose-*.json", digits = "shards/train/digits-*.json" }
[[stage]]
name = "general"
steps = 2
mixture = "out/mixture.json"
''')
    assert load_recipe(tmp_path / "train.toml").stages[0].mixture == result["weights"]


def test_bad_recipes_are_named(tmp_path):
    (tmp_path / "m.toml").write_text('shards = "s"\ntokenizer = "t"\ncandidates = [{a = -1}]\n')
    with pytest.raises(RecipeError, match="candidates"):
        load_mixture_recipe(tmp_path / "m.toml")
    (tmp_path / "m.toml").write_text('shards = "s"\ntokenizer = "t"\nstep = 3\n')
    with pytest.raises(RecipeError, match="unknown key"):
        load_mixture_recipe(tmp_path / "m.toml")
