"""The budget allocation in compress's report: predicted against measured KLD, llama.cpp's mixes
as the same sensitivities predict them, and the plot of predicted KLD against file size."""

from __future__ import annotations

MB = 1e6


def allocations(details: list[dict]) -> list[dict]:
    """The gguf_allocate steps' records."""
    return [d for d in details if "predicted" in d]


def allocation_lines(details: list[dict], measured_kld: float | None) -> list[str]:
    """Markdown: each allocation's predicted KLD beside the measured one, and llama.cpp's mixes."""
    lines = []
    for d in allocations(details):
        p = d["predicted"]
        size = "whole GGUF" if p["whole_file"] else "tensors"
        lines += ["## Allocation", "", f"- **{d['step']}**: {size} {p['bytes'] / MB:.2f} MB; predicted mean KLD "
                  f"{p['kld']:.4f} (the tensors' sensitivities summed, on calibration windows)"
                  + (f"; measured {measured_kld:.4f} (evaluation windows, the table above)"
                     if measured_kld is not None else ""),
                  "- llama.cpp's file types, as the same sensitivities predict them (their types where every "
                  "one is a candidate):", "", f"| file type | {size} MB | predicted KLD |", "|---|---|---|",
                  *(f"| {t} | {b / MB:.2f} | {k:.4f} |" for t, (b, k) in sorted(p["llamacpp_mixes"].items(),
                                                                              key=lambda kv: kv[1][0])),
                  "", "![allocation](allocation.png)", ""]
    return lines


def allocation_plot(details: list[dict], measured_kld: float | None, path) -> bool:
    """Predicted KLD against file size: the allocator's frontier, llama.cpp's mixes on the same
    sensitivities, the chosen allocation and its measured KLD. False when there was no allocation."""
    found = allocations(details)
    if not found:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for d in found:
        p = d["predicted"]
        ax.plot([b / MB for b, _ in p["frontier"]], [k for _, k in p["frontier"]], label="allocator's frontier")
        mixes = sorted(p["llamacpp_mixes"].items(), key=lambda kv: kv[1][0])
        ax.scatter([b / MB for _, (b, _) in mixes], [k for _, (_, k) in mixes], marker="o", color="gray",
                   label="llama.cpp's mixes (predicted)")
        for t, (b, k) in mixes:
            ax.annotate(t, (b / MB, k), fontsize=7)
        ax.scatter([p["bytes"] / MB], [p["kld"]], marker="s", color="C1", label="chosen (predicted)")
        if measured_kld is not None:
            ax.scatter([p["bytes"] / MB], [measured_kld], marker="*", s=120, color="C3", label="chosen (measured)")
    ax.set_yscale("log")
    ax.set_xlabel(("whole GGUF" if found[0]["predicted"]["whole_file"] else "allocated tensors") + ", MB")
    ax.set_ylabel("mean KLD from the base")
    ax.set_title("predicted KLD against size (sensitivities on calibration windows)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
