"""The advise report: the frontier table, the skipped candidates with reasons, and a plot."""

from __future__ import annotations

from pathlib import Path

from slimkit.benchmarks.model import bpw_cell
from slimkit.protocol import Protocol
from slimkit.results import AdviseResult, AdviseRow


def _row(r: AdviseRow) -> str:
    kld = f"{r.mean_kld:.4f}" if r.mean_kld is not None else "-"
    return (f"| {r.candidate} | {r.rule or '-'} | {r.ppl:.2f} | {r.ppl_increase:+.1%} | {kld} | "
            f"{r.decode_ms_per_token:.1f} | {r.decode_speedup:.2f}x | {r.throughput_tok_s:.1f} | "
            f"{r.peak_rss_mb:.0f} | {r.disk_mb:.0f} | {bpw_cell(r.bits_per_weight)} | {'yes' if r.meets else ('-' if not r.rule else 'no')} | "
            f"{'*' if r.pareto else ''} |")


def _against(base: AdviseRow) -> list[str]:
    """Which dense configuration the speed-ups are against (the fastest one measured on this machine)."""
    if not base.baseline:
        return []
    return ["Speed-ups (x) are against the fastest dense configuration measured here: "
            + "; ".join(f"{k}: {v}" for k, v in base.baseline.items()) + ".", ""]


def markdown(result: AdviseResult) -> str:
    c = result.constraints
    budget = [f"ppl increase <= {c['max_ppl_increase']:.0%}"]
    if c.get("max_kld"):
        budget.append(f"mean KLD <= {c['max_kld']:.4f}")
    if c["max_memory_mb"]:
        budget.append(f"peak RSS <= {c['max_memory_mb']:.0f} MB")
    if c["max_decode_ms"]:
        budget.append(f"decode <= {c['max_decode_ms']:.1f} ms/token")
    if c["min_throughput"]:
        budget.append(f"throughput >= {c['min_throughput']:.1f} tok/s")
    rows = [result.baseline, *result.candidates]
    lines = [
        f"# slimkit advise: {result.model}",
        "",
        f"- device: {result.device['name']} ({result.device['kind']}, {result.device['cores']} cores)",
        f"- constraints: {', '.join(budget)}",
        f"- measured: each candidate packed in its real format and run in its own process; protocol "
        f"{Protocol(**result.settings['protocol']).describe()}",
        "",
        "## Recommendation",
        "",
        f"**{result.recommended or 'none'}**" + (f" (recipe `{result.recommended_recipe}`, packed as "
                                                   f"`{result.recommended_pack}`; written to recommended.yaml)"
                                                   if result.recommended else ""),
        "",
        result.reason,
        "",
        f"## Measured candidates (* = on the Pareto frontier of {'KLD' if c.get('max_kld') else 'ppl'}, decode "
        "latency and peak memory)",
        "",
        "| candidate | rule | ppl | ppl change | KLD | decode ms/tok | decode x | tok/s @batch | peak RSS MB | disk MB "
        "| bpw (whole file) | meets | frontier |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *[_row(r) for r in rows],
        "",
        *_against(result.baseline),
        "## Skipped, with the reason",
        "",
        *[f"- {s.candidate} (rule {s.rule}): {s.reason}" for s in result.skipped],
        "",
        "![frontier](frontier.png)",
        "",
    ]
    return "\n".join(lines)


def frontier_plot(rows: list[AdviseRow], path: Path, model: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        color = "tab:green" if r.meets else ("tab:blue" if not r.rule else "tab:red")
        ax.scatter(r.decode_ms_per_token, r.ppl, s=20 + r.peak_rss_mb / 3, color=color, alpha=0.6,
                   edgecolors="black" if r.pareto else "none")
        ax.annotate(r.candidate, (r.decode_ms_per_token, r.ppl), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)
    front = sorted((r for r in rows if r.pareto), key=lambda r: r.decode_ms_per_token)
    ax.plot([r.decode_ms_per_token for r in front], [r.ppl for r in front], "k--", lw=0.8, label="Pareto frontier")
    ax.title.set_fontsize(10)
    ax.set(xlabel="decode latency, ms/token (batch 1)", ylabel="perplexity (lower is better)",
           title=f"{model}: accuracy vs latency\n(marker area ~ peak memory; green = meets the constraints, "
                 "red = misses, blue = dense)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
