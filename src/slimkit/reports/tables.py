"""Comparison tables from run reports: markdown for files, rich for the terminal."""

from __future__ import annotations

from slimkit.reports.allocation import allocation_lines
from slimkit.results import CompressReport, Quality

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
    "KLD",
    "top-1",
    "time s",
)


def _quality(q: Quality) -> str:
    return f"{q.value:.3f}" if q.metric == "cosine" else f"{q.value:.2f}"


def _change(before: Quality, after: Quality) -> str:
    if before.metric == "cosine":
        return f"{after.value - before.value:+.4f}"
    return f"{(after.value / before.value - 1) * 100:+.1f}%"


def _divergence(q: Quality) -> dict[str, str]:
    d = q.divergence
    if d is None:
        return {"KLD": "-", "top-1": "-"}
    return {"KLD": f"{d.mean_kld:.4f}", "top-1": f"{d.top1_agreement:.1%}"}


def row(report: CompressReport) -> dict[str, str]:
    comp, size = report.compression, report.size
    return {
        "recipe": report.recipe_name,
        "method": report.recipe_summary,
        "sparsity": f"{comp.sparsity_overall:.1%}",
        "bits": comp.bits,
        "dense MB": f"{size.dense_bytes / MB:.1f}",
        "packed MB": f"{size.packed_bytes / MB:.1f}",
        "bpw": f"{report.packed_bits_per_weight:.2f}",
        "before": _quality(report.baseline),
        "after": _quality(report.compressed),
        "change": _change(report.baseline, report.compressed),
        **_divergence(report.compressed),
        "time s": f"{comp.seconds:.1f}",
    }


def baseline_row(report: CompressReport) -> dict[str, str]:
    size = report.size
    return {
        "recipe": "dense",
        "method": "-",
        "sparsity": f"{report.baseline_sparsity:.1%}",
        "bits": str(report.model.dtype_bits),
        "dense MB": f"{size.dense_bytes / MB:.1f}",
        "packed MB": f"{size.dense_bytes / MB:.1f}",
        "bpw": f"{report.model.dtype_bits:.2f}",
        "before": _quality(report.baseline),
        "after": _quality(report.baseline),
        "change": "-",
        "KLD": "0" if report.compressed.divergence else "-",
        "top-1": "100%" if report.compressed.divergence else "-",
        "time s": "-",
    }


def comparison_rows(reports: list[CompressReport]) -> list[dict[str, str]]:
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


def metric_legend(report: CompressReport) -> str:
    q = report.baseline
    if q.metric == "cosine":
        return "quality = mean cosine similarity of sentence embeddings to the uncompressed model"
    d = q.details
    return (
        f"quality = perplexity (lower is better) on {d['tokens']} tokens: {d['windows']} of "
        f"{d['total_windows']} windows of seqlen {d['seqlen']}, split {d['split_hash']}; KLD = mean "
        "KL(base || compressed) of the next-token distributions over the same tokens (0 = unchanged), "
        "top-1 = how often both models rank the same next token first"
    )


def report_markdown(report: CompressReport) -> str:
    rows = comparison_rows([report])
    lines = [
        f"# slimkit compress: {report.model.name} with `{report.recipe_name}`",
        "",
        markdown_table(rows),
        "",
        f"- {metric_legend(report)}",
        *divergence_lines(report.compressed),
        f"- protocol: {report.protocol}",
        f"- data: {report.data['description']}",
        "- dense MB: the uncompressed tensors; packed MB: the same model in its packed format, "
        "by the format's arithmetic (codes + scales, or bitmask + kept values).",
        f"- written to disk (dense safetensors with masks/quantization applied): "
        f"{report.size.stored_bytes / MB:.1f} MB",
        f"- dtype: stored as {report.model.stored_dtype} (the checkpoint's own); statistics, "
        f"compression and evaluation computed in {report.model.computed_in}",
        "",
        "## Size by tensor kind (dense, MB)",
        "",
        "| kind | MB |",
        "|---|---|",
        *(f"| {k} | {v / MB:.1f} |" for k, v in report.size.dense_by_kind.items()),
        "",
        *structure_lines(report.compression.structure_and_training),
        *allocation_lines(report.compression.structure_and_training, report.compressed.divergence.mean_kld
                          if report.compressed.divergence else None),
        *expert_lines(report.compression.engine),
        "## Per-layer sparsity and bits",
        "",
        "| layer | shape | sparsity | bits |",
        "|---|---|---|---|",
        *(
            f"| {layer.name} | {'x'.join(map(str, layer.shape))} | {layer.sparsity:.1%} | {layer.bits} |"
            for layer in report.compression.layers
        ),
        "",
    ]
    return "\n".join(lines)


def divergence_lines(q: Quality) -> list[str]:
    d = q.divergence
    if d is None:
        return []
    return [f"- divergence from the base model over {d.tokens} tokens: mean KLD {d.mean_kld:.4f}, "
            f"99th percentile {d.p99_kld:.4f}, top-1 agreement {d.top1_agreement:.1%}"]


def expert_lines(engine: list[dict]) -> list[str]:
    """Markdown for the tokens the router sent to each MoE expert during calibration."""
    passes = [e["experts"] for e in engine if e.get("experts")]
    if not passes:
        return []
    lines = ["## MoE experts (calibration tokens routed to each)", ""]
    for i, experts in enumerate(passes):
        counts = sorted(experts["tokens"].values())
        lines.append(f"- pass {i + 1}: {experts['count']} experts; tokens min {counts[0]}, median "
                     f"{counts[len(counts) // 2]}, max {counts[-1]}; {len(experts['data_free'])} below "
                     f"{experts['min_tokens']} tokens got the data-free fallback (identity statistics)")
        lines += [f"  - {name}: {experts['tokens'][name]} tokens" for name in experts["data_free"]]
    return lines + [""]


def structure_lines(details: list[dict]) -> list[str]:
    """Markdown for structural pruning and distillation steps (nothing when there were none)."""
    if not details:
        return []
    lines = ["## Structure and training", ""]
    for d in details:
        lines.append(f"- **{d['step']}**")
        if "parameters_before" in d:
            lines.append(f"  - parameters: {d['parameters_before']:,} -> {d['parameters_after']:,} "
                         f"({d['parameters_after'] / d['parameters_before']:.1%})")
            for key, (a, b) in d["config_changes"].items():
                lines.append(f"  - {key}: {a} -> {b}")
            if d.get("dropped_layers"):
                lines.append(f"  - dropped blocks: {d['dropped_layers']}")
            lines += [f"  - note: {n}" for n in d.get("notes", [])]
        if "final_eval" in d:
            log = d.get("log") or []
            first = next((r for r in log if any(k.startswith("eval_") and r.get(k) for k in r)), None)
            lines.append(f"  - steps: {len(log)}; final held-out eval: "
                         + ", ".join(f"{k} {v:.4g}" for k, v in d["final_eval"].items())
                         + (f" (first eval at step {first['step']}: "
                            + ", ".join(f"{k[5:]} {first[k]}" for k in first if k.startswith("eval_") and first[k]) + ")"
                            if first else ""))
            lines.append(f"  - run dir (checkpoints, log.csv, config.json): `{d['run_dir']}`"
                         + (f"; resumed from step {d['resumed_from_step']}" if d.get("resumed_from_step") else ""))
            lines.append("  - loss curve: training_curve.png")
    return lines + [""]


def training_plot(details: list[dict], path) -> bool:
    """Loss terms (and held-out eval) per step for every distill step; False when there were none."""
    logs = [d for d in details if d.get("log")]
    if not logs:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for d in logs:
        rows = d["log"]
        steps = [int(r["step"]) for r in rows]
        for key in rows[0]:
            if key in ("step", "lr", "grad_norm") or key.startswith("eval_"):
                continue
            values = [float(r[key]) if r[key] else float("nan") for r in rows]
            if any(v != 0 for v in values):
                axes[0].plot(steps, values, label=key)
        for key in (k for k in rows[0] if k.startswith("eval_")):
            pts = [(int(r["step"]), float(r[key])) for r in rows if r[key]]
            if pts:
                axes[1].plot(*zip(*pts), marker="o", label=key[5:])
    axes[0].set(xlabel="step", ylabel="loss", title="training loss terms")
    axes[1].set(xlabel="step", title="held-out evaluation")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def dict_table(rows: list[dict]) -> str:
    """A markdown table of arbitrary rows (columns: every key, in first-seen order)."""
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
