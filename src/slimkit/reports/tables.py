"""Comparison tables from run reports: markdown for files, rich for the terminal."""

from __future__ import annotations

MB = 1e6

COLUMNS = (
    "recipe",
    "method",
    "sparsity",
    "bits",
    "dense MB",
    "packed MB",
    "before",
    "after",
    "change",
    "time s",
)


def _quality(q: dict | None) -> str:
    if not q:
        return "-"
    return f"{q['value']:.3f}" if q["metric"] == "cosine" else f"{q['value']:.2f}"


def _change(before: dict, after: dict) -> str:
    if before["metric"] == "cosine":
        return f"{after['value'] - before['value']:+.4f}"
    return f"{(after['value'] / before['value'] - 1) * 100:+.1f}%"


def row(report: dict) -> dict[str, str]:
    comp, size = report["compression"], report["size"]
    return {
        "recipe": report["recipe"]["name"],
        "method": report["recipe_summary"],
        "sparsity": f"{comp['sparsity_overall']:.1%}",
        "bits": comp["bits"],
        "dense MB": f"{size['dense_bytes'] / MB:.1f}",
        "packed MB": f"{size['packed_bytes'] / MB:.1f}",
        "before": _quality(report["baseline"]),
        "after": _quality(report["compressed"]),
        "change": _change(report["baseline"], report["compressed"]),
        "time s": f"{comp['seconds']:.1f}",
    }


def baseline_row(report: dict) -> dict[str, str]:
    size = report["size"]
    return {
        "recipe": "dense",
        "method": "-",
        "sparsity": f"{report['baseline_sparsity']:.1%}",
        "bits": str(report["model"]["dtype_bits"]),
        "dense MB": f"{size['dense_bytes'] / MB:.1f}",
        "packed MB": f"{size['dense_bytes'] / MB:.1f}",
        "before": _quality(report["baseline"]),
        "after": _quality(report["baseline"]),
        "change": "-",
        "time s": "-",
    }


def comparison_rows(reports: list[dict]) -> list[dict[str, str]]:
    return [baseline_row(reports[0])] + [row(r) for r in reports]


def markdown_table(rows: list[dict[str, str]]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(r[c] for c in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def rich_table(rows: list[dict[str, str]], title: str):
    from rich.table import Table

    table = Table(title=title)
    for c in COLUMNS:
        table.add_column(c, justify="left" if c in ("recipe", "method") else "right",
                         no_wrap=c not in ("recipe", "method"), overflow="fold")
    for r in rows:
        table.add_row(*(r[c] for c in COLUMNS))
    return table


def metric_legend(report: dict) -> str:
    q = report["baseline"]
    if q["metric"] == "cosine":
        return "quality = mean cosine similarity of sentence embeddings to the uncompressed model"
    d = q["details"]
    return (
        f"quality = perplexity (lower is better) on {d['tokens']} tokens: {d['windows']} of "
        f"{d['total_windows']} windows of seqlen {d['seqlen']}, split {d['split_hash']}"
    )


def report_markdown(report: dict) -> str:
    rows = comparison_rows([report])
    lines = [
        f"# slimkit compress: {report['model']['name']} with `{report['recipe']['name']}`",
        "",
        markdown_table(rows),
        "",
        f"- {metric_legend(report)}",
        f"- protocol: {report['protocol']}",
        f"- data: {report['data']['description']}",
        "- dense MB: the uncompressed tensors; packed MB: the same model in its packed format, "
        "by the format's arithmetic (codes + scales, or bitmask + kept values).",
        f"- written to disk (dense safetensors with masks/quantization applied): "
        f"{report['size']['stored_bytes'] / MB:.1f} MB",
        "",
        "## Size by tensor kind (dense, MB)",
        "",
        "| kind | MB |",
        "|---|---|",
        *(f"| {k} | {v / MB:.1f} |" for k, v in report["size"]["dense_by_kind"].items()),
        "",
        "## Per-layer sparsity and bits",
        "",
        "| layer | shape | sparsity | bits |",
        "|---|---|---|---|",
        *(
            f"| {layer['name']} | {'x'.join(map(str, layer['shape']))} | {layer['sparsity']:.1%} | {layer['bits']} |"
            for layer in report["compression"]["layers"]
        ),
        "",
    ]
    return "\n".join(lines)
