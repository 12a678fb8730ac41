"""The per-run summary of the data pipeline: report.md (documents in / kept / dropped per rule,
languages, domains, duplicates, tokens per domain) and bar charts (report_*.png, when matplotlib
is installed), plus summary.json with the same numbers for scripts."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from qwen2.atomic import atomic_write_text


def write_report(recipe: Any, out: Path, stage1: list[dict], dedup: dict, stage2: list[dict]) -> Path:
    documents_in = sum(s["documents_in"] for s in stage1)
    bytes_in = sum(s["bytes_in"] for s in stage1)
    kept = sum(s["kept"] for s in stage1)
    rejected = sum(s["rejected_lines"] for s in stage1)
    dropped, languages, domains = Counter(), Counter(), Counter()
    for s in stage1:
        dropped.update(s["dropped"])
        languages.update(s["languages"])
        domains.update(s["domains"])
    written = sum(s["documents_out"] for s in stage2)
    documents_out, tokens = Counter(), Counter()
    for s in stage2:
        documents_out.update(s["documents"])
        for domain, counts in s["tokens"].items():
            tokens[domain] += sum(counts.values())
    per_input: dict[str, Counter] = {}
    for s in stage1:
        per_input.setdefault(s["input"], Counter()).update({"in": s["documents_in"], "kept": s["kept"]})

    lines = [f"# Data pipeline run: {recipe.name}", "",
             f"{documents_in:,} documents ({bytes_in / 1e6:.1f} MB) in, {rejected:,} unreadable lines or rows "
             f"(rejects.jsonl), {kept:,} passed the filters, {dedup['exact_removed']:,} exact and "
             f"{dedup['near_removed']:,} near duplicates removed ({dedup['near_clusters']:,} clusters), "
             f"**{written:,} documents and {sum(tokens.values()):,} tokens out**.", "",
             "| input | documents in | passed filters |", "|---|---|---|"]
    lines += [f"| {name} | {c['in']:,} | {c['kept']:,} |" for name, c in per_input.items()]
    lines += ["", "## Dropped, by rule", "", "| rule | documents |", "|---|---|"]
    lines += [f"| {rule} | {n:,} |" for rule, n in _ranked(dropped)] or ["| (none) | 0 |"]
    lines += ["", "## Languages (of documents passing the filters; code has none)", "", "| language | documents |",
              "|---|---|"]
    lines += [f"| {lang} | {n:,} |" for lang, n in _ranked(languages)]
    lines += ["", "## Domains", "", "| domain | passed filters | written | tokens |", "|---|---|---|---|"]
    lines += [f"| {d} | {domains[d]:,} | {documents_out[d]:,} | {tokens[d]:,} |" for d in sorted(domains)]
    charts = _charts(out, dropped, languages, tokens)
    if charts:
        lines += ["", *[f"![{name}]({name})" for name in charts]]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    atomic_write_text(out / "summary.json", json.dumps(
        {"documents_in": documents_in, "bytes_in": bytes_in, "rejected_lines": rejected, "passed_filters": kept,
         "dropped": dict(dropped), "languages": dict(languages), "domains": dict(domains), "dedup": dedup,
         "documents_out": dict(documents_out), "tokens": dict(tokens)}, indent=1, sort_keys=True))
    return report


def _ranked(counts: Counter) -> list[tuple[str, int]]:
    """Largest first, ties by name: the same order however the counts were gathered."""
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def _charts(out: Path, dropped: Counter, languages: Counter, tokens: Counter) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names = []
    for name, counts, title in (("report_dropped.png", dropped, "documents dropped, by rule"),
                                ("report_languages.png", languages, "documents kept, by language"),
                                ("report_tokens.png", tokens, "tokens written, by domain")):
        if not counts:
            continue
        items = _ranked(counts)[:25]
        fig, ax = plt.subplots(figsize=(7, 0.3 * len(items) + 1.2))
        ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="#4c72b0")
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        names.append(name)
    return names
