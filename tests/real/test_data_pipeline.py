"""The data pipeline end to end on real text (standard-library code, the shakespeare plays, the
hand-written multilingual samples) into shards in the demo model's tokenizer, and the trainer
pre-training on those shards by domain mixture."""

import json
from pathlib import Path

from qwen2.data.pipeline import load_pipeline_recipe, run_pipeline

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_raw_files_to_shards_the_trainer_reads(tmp_path):
    text = (RECIPES / "data-demo.toml").read_text(encoding="utf-8")
    # the same recipe on part of the standard library (the whole of it is the benchmark run)
    text = text.replace('paths = ["{stdlib}"]', 'paths = ["{stdlib}/json", "{stdlib}/email", "{stdlib}/textwrap.py"]')
    text = text.replace('"data/multilingual_samples.jsonl"', f'"{RECIPES / "data" / "multilingual_samples.jsonl"}"')
    (tmp_path / "data.toml").write_text(text, encoding="utf-8")
    summary = run_pipeline(load_pipeline_recipe(tmp_path / "data.toml"), tmp_path / "data", progress=False)
    report = json.loads((tmp_path / "data" / "summary.json").read_text())
    assert report["documents_in"] == summary.documents_in > 100
    assert set(summary.tokens) == {"code", "books", "multilingual"}
    assert report["languages"]["en"] >= 70 and len(report["languages"]) >= 14  # the plays + 13 other languages
    assert (tmp_path / "data" / "report.md").read_text().startswith("# Data pipeline run")

    from qwen2.train.pretrain import run
    from qwen2.train.recipe import load_recipe

    train = (RECIPES / "data-demo-train.toml").read_text(encoding="utf-8").replace("../runs/data-demo", str(tmp_path / "data"))
    train = train.replace("steps = 100", "steps = 3").replace("eval_every = 50", "eval_every = 3")
    (tmp_path / "train.toml").write_text(train, encoding="utf-8")
    result = run(load_recipe(tmp_path / "train.toml"), tmp_path / "run", progress=False)
    assert result.steps == 3 and result.val_loss is not None
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert set(metrics[-1]["epochs"]) == {"code", "books", "multilingual"}
