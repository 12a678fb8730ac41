"""The pre-training data pipeline: raw files -> documents that pass every filter, deduplicated and
decontaminated -> token shards the trainer reads, with a report. `qwen2 data run --recipe FILE`.

Work is cut into units (a few files, one JSONL / Parquet file, or a slice of a built-in corpus),
numbered in a fixed order, and runs in three steps:

1. per unit (in parallel): read leniently (bad lines to rejects.jsonl), normalise, identify the
   language, tag the domain, apply the heuristic filters for that domain, decontaminate, score
   quality (classifier and / or a Qwen2 model's perplexity); keep the rest with their exact-dedup
   key and MinHash signature. Every dropped document is recorded with the rule that dropped it.
2. once: exact and near-duplicate clusters over all units' keys and signatures (qwen2.data.dedup);
   each cluster keeps its first document in unit order.
3. per unit (in parallel): the survivors, written per domain as documents and as token shards.

Each unit's step writes its outputs first and a DONE marker (its statistics) last, so a crashed or
killed run, started again, redoes only the units without markers: nothing lost, nothing twice, and
the same files as an uninterrupted run. The executor (a local process pool or Ray) does not change
any output: results are gathered in unit order.

Layout under the output directory: units.json (the plan), stage1/<unit>/, dedup/, stage2/<unit>/,
documents/<domain>/<unit>.jsonl.zst, shards/{train,val}/<domain>-<unit>-NNNNN.{bin,idx,json},
tokenizer/, report.md and report_*.png. The recipe format is docs/DATA.md.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import time
import math
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from qwen2.atomic import atomic_write_text
from qwen2.data.dedup import DedupConfig, exact_key, near_duplicate_clusters, signatures
from qwen2.data.filters import (C4Quality, CodeQuality, FineWebQuality, GopherQuality, GopherRepetition,
                                HeuristicConfig, apply_heuristics)
from qwen2.data.normalize import NormalizeConfig, normalize_text
from qwen2.data.readers import DataError, Document, expand_paths, read_file, read_text_file
from qwen2.data.writers import DocumentWriter, RejectWriter
from qwen2.tomlspec import RecipeError, build, read_toml

FAMILIES = ("gopher_quality", "gopher_repetition", "c4", "fineweb", "code")
# Code gets the code rules only (repeated lines are normal in code); books skip the repetition rules
# (a play repeats its speakers' names on a third of its lines) and the web-page rules.
DEFAULT_FAMILIES = {"code": ["code"], "books": ["gopher_quality"],
                    "multilingual": ["gopher_repetition", "gopher_quality", "fineweb"],
                    "default": ["gopher_repetition", "gopher_quality", "c4", "fineweb"]}


# ---- the recipe ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class InputSpec:
    name: str
    paths: list = field(default_factory=list)  # files / directories; "{stdlib}" = this Python's standard library
    glob: str | None = None      # read every file matching this under the paths as one text document
    exclude: list = field(default_factory=list)  # glob inputs: skip files whose path under the root matches
    corpus: str | None = None    # or a built-in corpus ("shakespeare")
    domain: str | None = None    # declared domain of every document (else tagged per document)
    files_per_unit: int = 64     # glob inputs: files per work unit
    docs_per_unit: int = 16      # corpora: documents per work unit


@dataclass(frozen=True)
class FilterSpec:
    families: dict = field(default_factory=dict)  # domain (or "default") -> rule families; DEFAULT_FAMILIES otherwise
    min_chars: int = 1


@dataclass(frozen=True)
class LangSpec:
    keep: list | None = None      # languages to keep (ISO 639-1); None = every language
    min_confidence: float = 0.0


@dataclass(frozen=True)
class QualitySpec:
    classifier: str | None = None      # a qwen2.data.quality.QualityClassifier JSON file
    min_score: dict = field(default_factory=dict)   # "domain", "domain:lang" or "default" -> lowest P(good)
    perplexity_model: str | None = None  # "demo", a model directory or GGUF: score NLL per token
    max_nll: dict = field(default_factory=dict)     # "domain", "domain:lang" or "default" -> highest NLL
    max_tokens: int = 256
    batch_size: int = 8


@dataclass(frozen=True)
class DecontamSpec:
    humaneval: bool = True
    jsonl: list = field(default_factory=list)  # more eval sets (JSONL files)
    fields: list = field(default_factory=lambda: ["text"])
    ngram: int = 13
    lcs_ratio: float = 0.6


DOCUMENT_FORMATS = ("jsonl.zst", "jsonl.gz", "jsonl", "parquet")


@dataclass(frozen=True)
class PackSpec:
    documents_format: str = "jsonl.zst"  # the kept documents: jsonl.zst, jsonl.gz, jsonl or parquet
    enabled: bool = True  # token shards
    tokenizer: str = "demo"  # "demo", a model or tokenizer directory, or a GGUF file
    val_fraction: float = 0.05
    shard_tokens: int = 1 << 26


@dataclass(frozen=True)
class ExecutorSpec:
    kind: str = "local"   # or "ray"
    workers: int = 2
    address: str | None = None  # ray: a cluster to join; None = a local Ray


@dataclass(frozen=True)
class PipelineRecipe:
    name: str
    path: Path
    inputs: tuple[InputSpec, ...]
    normalize: NormalizeConfig = NormalizeConfig()
    filters: FilterSpec = FilterSpec()
    langid: LangSpec = LangSpec()
    quality: QualitySpec = QualitySpec()
    dedup: DedupConfig = DedupConfig()
    decontam: DecontamSpec | None = DecontamSpec()
    pack: PackSpec = PackSpec()
    executor: ExecutorSpec = ExecutorSpec()

    def resolve(self, value: str) -> Path:
        if value.startswith("{stdlib}"):
            import sysconfig

            value = sysconfig.get_paths()["stdlib"] + value[len("{stdlib}"):]
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.path.parent / path


def load_pipeline_recipe(path: str | Path) -> PipelineRecipe:
    path = Path(path)
    raw = read_toml(path)
    where = str(path)
    tables = {"normalize": NormalizeConfig, "filters": FilterSpec, "langid": LangSpec, "quality": QualitySpec,
              "dedup": DedupConfig, "decontam": DecontamSpec, "pack": PackSpec, "executor": ExecutorSpec}
    known = {"name", "input", *tables}
    if unknown := sorted(set(raw) - known):
        raise RecipeError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    inputs_raw = raw.get("input", [])
    if not isinstance(inputs_raw, list) or not inputs_raw:
        raise RecipeError(f"{where}: at least one [[input]] (name and paths or corpus) is needed")
    inputs = tuple(build(InputSpec, i, f"{where}: input {n + 1}") for n, i in enumerate(inputs_raw))
    names = [i.name for i in inputs]
    if len(set(names)) != len(names):
        raise RecipeError(f"{where}: input names must be unique (got {names})")
    for i in inputs:
        if bool(i.paths) == bool(i.corpus):
            raise RecipeError(f"{where}: input {i.name!r} needs either paths or corpus")
    parts = {key: build(cls, raw[key], f"{where}: [{key}]") for key, cls in tables.items() if key in raw}
    if "decontam" in raw and raw["decontam"].get("enabled") is False:
        parts["decontam"] = None
    for domain, families in (parts.get("filters") or FilterSpec()).families.items():
        if not isinstance(families, list) or any(f not in FAMILIES for f in families):
            raise RecipeError(f"{where}: [filters] families.{domain} must list some of {FAMILIES}")
    if (parts.get("pack") or PackSpec()).documents_format not in DOCUMENT_FORMATS:
        raise RecipeError(f"{where}: [pack] documents_format must be one of {DOCUMENT_FORMATS}")
    ex = parts.get("executor") or ExecutorSpec()
    if ex.kind not in ("local", "ray") or ex.workers < 1:
        raise RecipeError(f"{where}: [executor] kind must be 'local' or 'ray' and workers >= 1")
    return PipelineRecipe(name=str(raw.get("name", path.stem)), path=path.resolve(), inputs=inputs, **parts)


# ---- units --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Unit:
    index: int
    input: str
    files: tuple[str, ...] = ()   # files read by the readers (or, with text_files, as whole texts)
    text_files: bool = False
    corpus: str | None = None
    start: int = 0                # corpus slice
    end: int = 0

    @property
    def id(self) -> str:
        return f"{self.index:05d}-{self.input}"


def plan_units(recipe: PipelineRecipe) -> list[Unit]:
    units: list[Unit] = []
    for spec in recipe.inputs:
        if spec.corpus:
            from qwen2.data.corpora import corpus_documents
            from qwen2.demo import cache_dir

            n = len(corpus_documents(spec.corpus, cache_dir() / "corpora"))
            for a in range(0, n, spec.docs_per_unit):
                units.append(Unit(len(units), spec.name, corpus=spec.corpus, start=a, end=min(a + spec.docs_per_unit, n)))
        elif spec.glob:
            files: list[str] = []
            for raw in spec.paths:
                root = recipe.resolve(raw)
                if root.is_file():
                    files.append(str(root))
                elif root.is_dir():
                    files += sorted(str(p) for p in root.rglob(spec.glob) if p.is_file() and not any(
                        fnmatch.fnmatch(str(p.relative_to(root)), pattern) for pattern in spec.exclude))
                else:
                    raise DataError(f"input {spec.name!r}: {root}: no such file or directory")
            if not files:
                raise DataError(f"input {spec.name!r}: no files match {spec.glob!r} under {spec.paths}")
            for a in range(0, len(files), spec.files_per_unit):
                units.append(Unit(len(units), spec.name, files=tuple(files[a:a + spec.files_per_unit]), text_files=True))
        else:
            for path in expand_paths(recipe.resolve(p) for p in spec.paths):
                units.append(Unit(len(units), spec.name, files=(str(path),)))
    return units


_cache: dict[str, Any] = {}  # per worker process: models, tokenizers, decontamination index


def _cached(key: str, make) -> Any:
    if key not in _cache:
        _cache[key] = make()
    return _cache[key]


def unit_documents(unit: Unit, on_error: RejectWriter) -> Iterator[Document]:
    if unit.corpus:
        from qwen2.data.corpora import corpus_documents
        from qwen2.demo import cache_dir

        documents = _cached(f"corpus:{unit.corpus}", lambda: corpus_documents(unit.corpus, cache_dir() / "corpora"))
        yield from documents[unit.start:unit.end]
    elif unit.text_files:
        for name in unit.files:
            yield from read_text_file(Path(name), on_error=on_error)
    else:
        for name in unit.files:
            yield from read_file(Path(name), on_error=on_error)


# ---- step 1: filter -----------------------------------------------------------------------------

def _threshold(table: dict, domain: str, lang: str | None) -> float | None:
    for key in (f"{domain}:{lang}", domain, "default"):
        if key in table:
            return float(table[key])
    return None


def _heuristics(recipe: PipelineRecipe, domain: str) -> HeuristicConfig:
    # the recipe's families for this domain, else the built-in ones for it (code, books,
    # multilingual), else the recipe's default, else the built-in default; [] = no rules
    user = recipe.filters.families
    families = next(table[key] for table, key in ((user, domain), (DEFAULT_FAMILIES, domain), (user, "default"),
                                                  (DEFAULT_FAMILIES, "default")) if key in table)
    on = set(families)
    return HeuristicConfig(gopher_quality=GopherQuality() if "gopher_quality" in on else None,
                           gopher_repetition=GopherRepetition() if "gopher_repetition" in on else None,
                           c4=C4Quality(terminal_punctuation=False) if "c4" in on else None,
                           fineweb=FineWebQuality() if "fineweb" in on else None,
                           code=CodeQuality() if "code" in on else None,
                           code_domains=frozenset({domain}) if "code" in on else frozenset())


def _decontaminator(recipe: PipelineRecipe):
    from qwen2.data.decontam import Decontaminator, humaneval_items, jsonl_items

    spec = recipe.decontam
    items = humaneval_items() if spec.humaneval else []
    for path in spec.jsonl:
        items += jsonl_items(recipe.resolve(path), tuple(spec.fields))
    return Decontaminator(items, ngram=spec.ngram, lcs_ratio=spec.lcs_ratio)


def run_unit_filter(unit: Unit, recipe: PipelineRecipe, out: str) -> dict:
    """Step 1 for one unit (see the module docstring); returns its statistics."""
    from qwen2.data.domains import tag_domain
    from qwen2.data.langid import identify

    folder = Path(out) / "stage1" / unit.id
    done = folder / "DONE"
    if done.is_file():
        return json.loads(done.read_text(encoding="utf-8"))
    shutil.rmtree(folder, ignore_errors=True)  # a half-done unit from a killed run starts over
    folder.mkdir(parents=True)
    stats: dict[str, Any] = {"unit": unit.id, "input": unit.input, "documents_in": 0, "bytes_in": 0, "kept": 0,
                             "dropped": Counter(), "languages": Counter(), "domains": Counter(), "rejected_lines": 0}
    spec = next(i for i in recipe.inputs if i.name == unit.input)
    rejects = RejectWriter(folder / "rejects.jsonl")
    decontaminator = None
    if recipe.decontam:
        decontaminator = _cached(f"decontam:{recipe.path}:{recipe.decontam}", lambda: _decontaminator(recipe))
    classifier = None
    if recipe.quality.classifier:
        from qwen2.data.quality import QualityClassifier

        path = recipe.resolve(recipe.quality.classifier)
        classifier = _cached(f"classifier:{path}", lambda: QualityClassifier.load(path))
    kept: list[Document] = []
    dropped: list[dict] = []
    clock = Clock()

    def drop(doc: Document, rule: str, detail: str) -> None:
        stats["dropped"][rule] += 1
        dropped.append({"id": doc.id, "rule": rule, "detail": detail})

    documents = unit_documents(unit, rejects)
    while True:
        with clock("read"):
            doc = next(documents, None)
        if doc is None:
            break
        stats["documents_in"] += 1
        stats["bytes_in"] += len(doc.text.encode("utf-8", errors="surrogatepass"))
        declared = spec.domain or doc.domain
        code = tag_domain(doc.text, declared=declared, source=doc.source, lang=None) == "code"
        with clock("normalize"):
            text = normalize_text(doc.text, code=code, config=recipe.normalize)
        if len(text) < recipe.filters.min_chars:
            drop(doc, "empty", f"{len(text)} characters after normalisation")
            continue
        with clock("langid"):
            lang, confidence = (None, 1.0) if code else (lambda g: (g.lang, g.confidence))(identify(text))
        domain = tag_domain(text, declared=declared, source=doc.source, lang=lang)
        if lang is not None:
            if recipe.langid.keep is not None and lang not in recipe.langid.keep:
                drop(doc, "langid.language", f"{lang} not kept")
                continue
            if confidence < recipe.langid.min_confidence:
                drop(doc, "langid.confidence", f"{lang} at {confidence:.2f} < {recipe.langid.min_confidence}")
                continue
        with clock("heuristics"):
            rules = _cached(f"heuristics:{domain}:{recipe.filters}", lambda: _heuristics(recipe, domain))
            text, rejection = apply_heuristics(text, lang, domain, rules)
        if rejection:
            drop(doc, rejection.rule, rejection.detail)
            continue
        with clock("decontam"):
            hit = decontaminator.check(text) if decontaminator else None
        if hit:
            drop(doc, "decontam", f"contains {hit.item} ({hit.shared} shared {decontaminator.ngram}-grams, "
                                  f"LCS {hit.lcs} words)")
            continue
        meta = dict(doc.meta)
        if classifier is not None:
            with clock("quality"):
                score = classifier.score([text])[0]
            meta["quality"] = round(score, 4)
            floor = _threshold(recipe.quality.min_score, domain, lang)
            if floor is not None and score < floor:
                drop(doc, "quality.classifier", f"P(good) {score:.3f} < {floor}")
                continue
        kept.append(dataclasses.replace(doc, text=text, lang=lang, domain=domain, meta=meta))
    rejects.close()
    stats["rejected_lines"] = rejects.count
    if recipe.quality.perplexity_model and kept:
        with clock("perplexity"):
            kept = _perplexity_filter(kept, recipe, drop)
    for doc in kept:
        stats["languages"][doc.lang or "code"] += 1
        stats["domains"][doc.domain] += 1
    stats["kept"] = len(kept)
    with DocumentWriter(folder / "kept.jsonl.zst") as writer:
        for doc in kept:
            writer.write(doc)
    atomic_write_text(folder / "dropped.jsonl", "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in dropped))
    with clock("dedup_keys"):
        atomic_write_text(folder / "exact.json", json.dumps([exact_key(d.text) for d in kept]))
        if recipe.dedup.near:
            np.save(folder / "signatures.npy", signatures([d.text for d in kept], recipe.dedup), allow_pickle=False)
    clock.save(folder / "timings.json", documents=stats["documents_in"], megabytes=stats["bytes_in"] / 1e6)
    stats = {k: dict(v) if isinstance(v, Counter) else v for k, v in stats.items()}
    atomic_write_text(done, json.dumps(stats, ensure_ascii=False, sort_keys=True))
    return json.loads(done.read_text(encoding="utf-8"))  # exactly what a resumed run reads back


class Clock:
    """Seconds per sub-stage of one unit; saved to timings.json beside (never inside) the outputs,
    which must be identical from run to run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        clock = self

        class _Timer:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                clock.seconds[name] = clock.seconds.get(name, 0.0) + time.perf_counter() - self.start

        return _Timer()

    def save(self, path: Path, **totals: float) -> None:
        atomic_write_text(path, json.dumps({"seconds": self.seconds, **totals}, sort_keys=True))


def _perplexity_filter(kept: list[Document], recipe: PipelineRecipe, drop) -> list[Document]:
    from qwen2.data.quality import PerplexityScorer

    q = recipe.quality

    def make():
        import torch

        from qwen2.checkpoint import load_pretrained

        torch.set_num_threads(1)  # one thread per worker: the executor provides the parallelism
        pretrained = load_pretrained(q.perplexity_model, dtype=torch.bfloat16)
        return PerplexityScorer(pretrained.model, pretrained.tokenizer, max_tokens=q.max_tokens,
                                batch_size=q.batch_size)

    scorer = _cached(f"perplexity:{q.perplexity_model}", make)
    out = []
    for doc, nll in zip(kept, scorer.score([d.text for d in kept])):
        ceiling = _threshold(q.max_nll, doc.domain, doc.lang)
        if not math.isnan(nll):
            doc.meta["nll"] = round(nll, 4)
        if ceiling is not None and not math.isnan(nll) and nll > ceiling:
            drop(doc, "quality.perplexity", f"NLL {nll:.3f} > {ceiling} nats/token")
        else:
            out.append(doc)
    return out


# ---- step 2: dedup ------------------------------------------------------------------------------

def run_dedup(units: list[Unit], recipe: PipelineRecipe, out: Path) -> dict:
    """Exact, then near-duplicate clusters over every unit's survivors, in unit order."""
    folder = out / "dedup"
    done = folder / "DONE"
    if done.is_file():
        return json.loads(done.read_text(encoding="utf-8"))
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, int]] = []
    keys: list[str] = []
    sigs = []
    for unit in units:
        unit_keys = json.loads((out / "stage1" / unit.id / "exact.json").read_text(encoding="utf-8"))
        rows += [(unit.id, i) for i in range(len(unit_keys))]
        keys += unit_keys
        if recipe.dedup.near:
            sigs.append(np.load(out / "stage1" / unit.id / "signatures.npy", allow_pickle=False))
    removed: dict[str, dict[int, str]] = {}
    first_of: dict[str, int] = {}
    exact_removed = 0
    alive = []
    for r, key in enumerate(keys):
        if recipe.dedup.exact and key in first_of:
            unit_id, i = rows[r]
            removed.setdefault(unit_id, {})[i] = f"exact duplicate of {rows[first_of[key]][0]}#{rows[first_of[key]][1]}"
            exact_removed += 1
        else:
            first_of.setdefault(key, r)
            alive.append(r)
    clusters_out = []
    near_removed = 0
    if recipe.dedup.near and alive:
        all_sigs = np.concatenate(sigs)[alive]
        for cluster in near_duplicate_clusters(all_sigs, recipe.dedup):
            members = [rows[alive[c]] for c in cluster]
            clusters_out.append([f"{u}#{i}" for u, i in members])
            for u, i in members[1:]:
                removed.setdefault(u, {})[i] = f"near duplicate of {members[0][0]}#{members[0][1]}"
                near_removed += 1
    summary = {"documents": len(keys), "exact_removed": exact_removed, "near_removed": near_removed,
               "near_clusters": len(clusters_out)}
    atomic_write_text(folder / "clusters.json", json.dumps(clusters_out, indent=0))
    atomic_write_text(folder / "removed.json", json.dumps({u: {str(i): why for i, why in v.items()}
                                                           for u, v in removed.items()}, sort_keys=True))
    atomic_write_text(done, json.dumps(summary, sort_keys=True))
    return json.loads(done.read_text(encoding="utf-8"))


# ---- step 3: write documents and token shards -----------------------------------------------------

def run_unit_write(unit: Unit, recipe: PipelineRecipe, out: str, removed: dict[str, str]) -> dict:
    from qwen2.data.readers import iter_documents
    from qwen2.data.shards import ShardWriter, document_end_id, split_of

    out = Path(out)
    folder = out / "stage2" / unit.id
    done = folder / "DONE"
    if done.is_file():
        return json.loads(done.read_text(encoding="utf-8"))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for stale in list((out / "shards").glob(f"*/*-{unit.id}-*")) + list((out / "documents").glob(f"*/{unit.id}.*")):
        stale.unlink()  # from a run killed inside this unit
    docs = [d for i, d in enumerate(iter_documents([out / "stage1" / unit.id / "kept.jsonl.zst"]))
            if str(i) not in removed]
    by_domain: dict[str, list[Document]] = {}
    for doc in docs:
        by_domain.setdefault(doc.domain or "web", []).append(doc)
    stats: dict[str, Any] = {"unit": unit.id, "documents_out": len(docs), "duplicates_removed": len(removed),
                             "documents": {}, "tokens": {}}
    tokenizer = None
    if recipe.pack.enabled:
        tokenizer = _cached(f"tokenizer:{recipe.path}:{recipe.pack.tokenizer}", lambda: _tokenizer(recipe))
    clock = Clock()
    for domain, domain_docs in sorted(by_domain.items()):
        target = out / "documents" / domain / f"{unit.id}.{recipe.pack.documents_format}"
        with clock("write_documents"), DocumentWriter(target) as writer:
            for doc in domain_docs:
                writer.write(doc)
        stats["documents"][domain] = len(domain_docs)
        if tokenizer is None:
            continue
        end = document_end_id(tokenizer)
        writers = {split: ShardWriter(out / "shards" / split, f"{domain}-{unit.id}", tokenizer.fingerprint,
                                      tokenizer.vocab_size, end, recipe.pack.shard_tokens) for split in ("train", "val")}
        counts = Counter()
        with clock("tokenize"):
            encoded = tokenizer.encode_batch([d.text for d in domain_docs])
        for doc, ids in zip(domain_docs, encoded):
            split = split_of(doc, recipe.pack.val_fraction)
            writers[split].add(ids, doc.source or unit.input)
            counts[split] += len(ids) + 1
        for writer in writers.values():
            writer.flush()
        stats["tokens"][domain] = dict(counts)
    clock.save(folder / "timings.json", documents=len(docs),
               megabytes=sum(len(d.text.encode("utf-8", errors="surrogatepass")) for d in docs) / 1e6)
    atomic_write_text(done, json.dumps(stats, sort_keys=True))
    return json.loads(done.read_text(encoding="utf-8"))


def _tokenizer(recipe: PipelineRecipe):
    from qwen2.checkpoint.loader import load_tokenizer, resolve

    value = recipe.pack.tokenizer
    path = recipe.resolve(value) if value != "demo" else None
    if path is not None and path.is_dir() and (path / "tokenizer.json").is_file():
        return load_tokenizer(path)  # a tokenizer directory (a model directory works too)
    return load_tokenizer(resolve(value if path is None else path))


# ---- the run ------------------------------------------------------------------------------------

@dataclass
class RunSummary:
    out: Path
    units: int
    documents_in: int
    kept: int
    written: int
    tokens: dict[str, int]
    dropped: dict[str, int]
    dedup: dict


def run_pipeline(recipe: PipelineRecipe, out: str | Path, *, executor=None, progress: bool = True,
                 stop_after_units: int | None = None) -> RunSummary | None:
    """Run (or resume) the pipeline into `out`. `stop_after_units` (tests: a run killed midway)
    stops after step 1 of that many units."""
    from tqdm import tqdm

    from qwen2.data.executors import make_executor
    from qwen2.data.report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    units = plan_units(recipe)
    plan = json.dumps([dataclasses.asdict(u) for u in units], indent=0)
    plan_file = out / "units.json"
    if plan_file.is_file() and plan_file.read_text(encoding="utf-8") != plan:
        raise DataError(f"{out}: holds a run of different inputs (units.json differs); use a new output directory")
    atomic_write_text(plan_file, plan)
    owned = executor is None
    executor = executor or make_executor(recipe.executor.kind, recipe.executor.workers, recipe.executor.address)
    try:
        todo = units if stop_after_units is None else units[:stop_after_units]
        wall = {"filter": time.perf_counter()}
        with tqdm(total=len(todo), desc="filter", unit=" units", disable=not progress, file=sys.stderr) as bar:
            stage1 = executor.map(run_unit_filter, [(u, recipe, str(out)) for u in todo], progress=bar.update)
        if stop_after_units is not None:
            return None
        wall["dedup"] = time.perf_counter()
        dedup = run_dedup(units, recipe, out)
        wall["write"] = time.perf_counter()
        removed = json.loads((out / "dedup" / "removed.json").read_text(encoding="utf-8"))
        with tqdm(total=len(units), desc="write", unit=" units", disable=not progress, file=sys.stderr) as bar:
            stage2 = executor.map(run_unit_write, [(u, recipe, str(out), removed.get(u.id, {})) for u in units],
                                  progress=bar.update)
        wall["end"] = time.perf_counter()
    finally:
        if owned and hasattr(executor, "close"):
            executor.close()
    if recipe.pack.enabled:
        _tokenizer(recipe).save(out / "tokenizer")
    tokens: Counter = Counter()
    for s in stage2:
        for domain, counts in s["tokens"].items():
            tokens[domain] += sum(counts.values())
    dropped: Counter = Counter()
    for s in stage1:
        dropped.update(s["dropped"])
    summary = RunSummary(out, len(units), sum(s["documents_in"] for s in stage1), sum(s["kept"] for s in stage1),
                         sum(s["documents_out"] for s in stage2), dict(tokens), dict(dropped), dedup)
    write_report(recipe, out, stage1, dedup, stage2)
    write_timings(out, units, wall, recipe.executor)
    return summary


def write_timings(out: Path, units: list[Unit], wall: dict[str, float], executor: ExecutorSpec) -> dict:
    """Throughput per step (wall clock, all workers) and per sub-stage (seconds summed over units,
    i.e. one worker's time): timings.json. Units resumed from an earlier run keep that run's times."""
    steps = {"filter": ("filter", "dedup"), "dedup": ("dedup", "write"), "write": ("write", "end")}
    per_stage: dict[str, dict[str, float]] = {}
    for step in ("stage1", "stage2"):
        totals = {"documents": 0.0, "megabytes": 0.0}
        seconds: Counter = Counter()
        for unit in units:
            path = out / step / unit.id / "timings.json"
            if path.is_file():
                t = json.loads(path.read_text(encoding="utf-8"))
                seconds.update(t["seconds"])
                totals["documents"] += t["documents"]
                totals["megabytes"] += t["megabytes"]
        for name, sec in seconds.items():
            per_stage[name] = {"seconds": round(sec, 3), "documents_per_s": round(totals["documents"] / sec, 1) if sec else 0,
                               "mb_per_s": round(totals["megabytes"] / sec, 3) if sec else 0}
    timings = {"executor": executor.kind, "workers": executor.workers,
               "wall_seconds": {k: round(wall[b] - wall[a], 2) for k, (a, b) in steps.items()},
               "per_worker_stage": per_stage}
    atomic_write_text(out / "timings.json", json.dumps(timings, indent=1, sort_keys=True))
    return timings
