"""Mixture search: choose the domain weights of pre-training data with experiments on small proxy
models, as the Qwen2 report tunes its distribution on scaled-down models.

Each candidate mixture trains one tiny Qwen2 (same seed, same steps, same tokens) on the pipeline's
token shards, and is scored by the proxy's held-out loss on every domain's validation shards
(nats per token; the objective is their weighted mean, equal weights by default). The best
candidate's weights go to mixture.json, which a training recipe's stage takes as
`mixture = "path/to/mixture.json"`. `qwen2 data mixture-search --recipe FILE`.
"""

from __future__ import annotations

import itertools
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwen2.atomic import atomic_write_text
from qwen2.data.readers import DataError
from qwen2.tomlspec import RecipeError, build, read_toml


@dataclass(frozen=True)
class MixtureSearchSpec:
    name: str
    path: Path
    shards: str                       # the pipeline's shards/ directory (train/ and val/ by domain)
    tokenizer: str                    # the tokenizer the shards were written in
    domains: list = field(default_factory=list)  # default: every domain with train and val shards
    candidates: list = field(default_factory=list)  # explicit mixtures ({domain = weight}); else a grid
    grid_step: float = 0.25           # simplex grid spacing when no candidates are given
    max_candidates: int = 8           # a random (seeded) subset of a larger grid
    objective: dict = field(default_factory=dict)  # domain -> weight of its held-out loss (default equal)
    seed: int = 0
    model: dict = field(default_factory=lambda: {"hidden_size": 64, "intermediate_size": 192,
                                                 "num_hidden_layers": 2, "num_attention_heads": 4,
                                                 "num_key_value_heads": 2})
    steps: int = 40
    seq_len: int = 128
    micro_batch_size: int = 8
    lr: float = 2e-3
    eval_batches: int = 8

    def resolve(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.path.parent / path


def load_mixture_recipe(path: str | Path) -> MixtureSearchSpec:
    path = Path(path)
    raw = read_toml(path)
    raw.setdefault("name", path.stem)
    spec = build(MixtureSearchSpec, raw, str(path), path=path.resolve())
    if spec.steps < 1 or not 0 < spec.grid_step <= 1 or spec.max_candidates < 1:
        raise RecipeError(f"{path}: need steps >= 1, 0 < grid_step <= 1 and max_candidates >= 1")
    for i, c in enumerate(spec.candidates):
        if not isinstance(c, dict) or not c or any(not isinstance(v, (int, float)) or v < 0 for v in c.values()):
            raise RecipeError(f"{path}: candidates[{i}] must be a table of non-negative weights")
    return spec


def simplex_grid(domains: list[str], step: float) -> list[dict[str, float]]:
    """Every mixture whose weights are multiples of `step`, sum to 1 and give each domain > 0."""
    n = round(1 / step)
    out = []
    for parts in itertools.product(range(1, n + 1), repeat=len(domains)):
        if sum(parts) == n:
            out.append({d: round(p * step, 6) for d, p in zip(domains, parts)})
    return out


def _domains(spec: MixtureSearchSpec) -> list[str]:
    from qwen2.data.shards import find_shards

    root = spec.resolve(spec.shards)

    def found(split: str) -> set[str]:
        folder = root / split
        return {p.name.split("-")[0] for p in folder.glob("*.json")} if folder.is_dir() else set()

    both = sorted(found("train") & found("val"))
    domains = list(spec.domains) or both
    missing = [d for d in domains if d not in both]
    if missing or not domains:
        raise DataError(f"{root}: no train and val shards for domain(s) {missing or '(any)'}; have {both}")
    for d in domains:
        find_shards(root / "train" / f"{d}-*.json")
    return domains


def proxy_recipe(spec: MixtureSearchSpec, domains: list[str], mixture: dict[str, float], name: str):
    from qwen2.train.recipe import DataSpec, ModelSpec, Recipe, StageSpec, TokenizerSpec, TrainSpec

    root = spec.resolve(spec.shards)
    train = TrainSpec(seq_len=spec.seq_len, micro_batch_size=spec.micro_batch_size, lr=spec.lr,
                      warmup_steps=max(1, spec.steps // 10), eval_every=10 ** 9, eval_batches=spec.eval_batches,
                      save_every=spec.steps, keep_last=1, log_every=max(1, spec.steps // 4), dtype="float32")
    return Recipe(name=name, path=spec.path, seed=spec.seed,
                  model=ModelSpec(preset="tiny", init=None, overrides={**spec.model, "max_position_embeddings":
                                                                      max(spec.seq_len, 128)}),
                  tokenizer=TokenizerSpec(path=str(spec.resolve(spec.tokenizer))),
                  data=DataSpec(sources={d: str(root / "train" / f"{d}-*.json") for d in domains}),
                  train=train, stages=(StageSpec(name="proxy", steps=spec.steps, mixture=mixture),))


@torch.inference_mode()
def held_out_losses(model_dir: Path, spec: MixtureSearchSpec, domains: list[str]) -> dict[str, float]:
    """Loss per token on the first validation batches of each domain (the same batches for every proxy)."""
    from qwen2.checkpoint import load_pretrained
    from qwen2.data.shards import TokenShard, find_shards
    from qwen2.train.data import validation_batches

    model = load_pretrained(model_dir, dtype=torch.float32).model.eval()
    root = spec.resolve(spec.shards)
    out = {}
    for d in domains:
        shards = [TokenShard.open(p) for p in find_shards(root / "val" / f"{d}-*.json")]
        total = count = 0.0
        for batch in validation_batches(shards, batch_size=spec.micro_batch_size, seq_len=spec.seq_len,
                                        max_batches=spec.eval_batches):
            total += float(model(batch.input_ids_BT, document_ids_BT=batch.document_ids_BT, labels_BT=batch.labels_BT))
            count += batch.num_tokens
        out[d] = total / count
    return out


def run_mixture_search(spec: MixtureSearchSpec, out: str | Path, *, progress: bool = True) -> dict:
    from qwen2.train.pretrain import run

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    domains = _domains(spec)
    candidates = [dict(c) for c in spec.candidates] or simplex_grid(domains, spec.grid_step)
    for c in candidates:
        if unknown := set(c) - set(domains):
            raise DataError(f"candidate {c} names domains without shards: {sorted(unknown)}")
    if len(candidates) > spec.max_candidates:
        candidates = random.Random(spec.seed).sample(candidates, spec.max_candidates)
    weights = spec.objective or {d: 1.0 for d in domains}
    results = []
    for i, mixture in enumerate(candidates):
        run_dir = out / f"proxy-{i:02d}"
        summary = run(proxy_recipe(spec, domains, mixture, f"{spec.name}-proxy-{i}"), run_dir, progress=False)
        losses = held_out_losses(run_dir / "model", spec, domains)
        objective = sum(weights.get(d, 0.0) * losses[d] for d in domains) / sum(weights.get(d, 0.0) for d in domains)
        results.append({"mixture": mixture, "held_out": losses, "objective": objective, "seconds": summary.seconds})
        if progress:
            print(f"  proxy {i + 1}/{len(candidates)} {mixture}: objective {objective:.4f} "
                  f"({', '.join(f'{d} {v:.3f}' for d, v in losses.items())})", file=sys.stderr, flush=True)
    best = min(results, key=lambda r: r["objective"])
    total = sum(best["mixture"].values())
    chosen = {d: best["mixture"].get(d, 0.0) / total for d in domains}
    atomic_write_text(out / "mixture.json", json.dumps({"weights": chosen, "objective": best["objective"],
                                                        "held_out": best["held_out"], "proxy_steps": spec.steps,
                                                        "candidates": results}, indent=1))
    lines = ["| mixture | " + " | ".join(f"{d} loss" for d in domains) + " | objective |",
             "|---|" + "---|" * (len(domains) + 1)]
    for r in sorted(results, key=lambda r: r["objective"]):
        mix = ", ".join(f"{d} {r['mixture'].get(d, 0):.2f}" for d in domains)
        lines.append(f"| {mix} | " + " | ".join(f"{r['held_out'][d]:.4f}" for d in domains) +
                     f" | {'**' if r is best else ''}{r['objective']:.4f}{'**' if r is best else ''} |")
    atomic_write_text(out / "mixture_search.md", "\n".join(lines) + "\n")
    return {"weights": chosen, "results": results}


def load_mixture_file(path: Path) -> dict[str, float]:
    """The weights of a mixture.json (for a training recipe's `mixture = "file"`)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecipeError(f"{path}: not a mixture file ({e})") from None
    weights = data.get("weights") if isinstance(data, dict) else None
    if not isinstance(weights, dict) or not weights or any(
            not isinstance(v, (int, float)) or v < 0 for v in weights.values()):
        raise RecipeError(f"{path}: a mixture file needs \"weights\": {{domain: weight >= 0}}")
    return {str(k): float(v) for k, v in weights.items()}

