"""`slimkit bench model --runtime llamacpp`: GGUF files measured where they are deployed.

Each model is a .gguf, a `slimkit export --to gguf` dir, or any model slimkit can export (it is
exported first: the baseline as F32, the others with `--gguf-type auto`, which keeps the codes
compression chose). llama.cpp's own tools measure everything: `llama-bench` prefill and decode
tokens/s at the given thread count, `llama-perplexity` ppl on the evaluation text and the KL
divergence from the baseline's distributions (saved once, --kl-divergence-base) with top-1
agreement. Threads spin in llama.cpp unless OMP_WAIT_POLICY=PASSIVE, which is set.
"""

from __future__ import annotations

from pathlib import Path

from slimkit.benchmarks.llamacpp import llamacpp_divergence, llamacpp_perplexity, llamacpp_speed
from slimkit.errors import SlimkitError
from slimkit.paths import ExportDir
from slimkit.progress import NoProgress, Progress
from slimkit.protocol import BenchSettings
from slimkit.results import LlamaCppRow

CTX = 512


def evaluation_text(path: Path, data: str | None = None) -> Path:
    """The evaluation documents as llama-perplexity reads them (joined by a blank line)."""
    from slimkit.data import load_split

    path.write_text("\n\n".join(d.text for d in load_split(data).evaluation), encoding="utf-8")
    return path


def gguf_of(source: str, work: Path, baseline: bool) -> Path:
    """A GGUF file for `source`: itself, the one in an export dir, or an export made in `work`."""
    path = Path(source)
    if path.suffix == ".gguf" and path.is_file():
        return path
    if ExportDir(path).gguf.is_file():
        return ExportDir(path).gguf
    from slimkit.export.job import export_model

    target = work / f"export-{len(list(work.glob('export-*')))}"
    export_model(source, target, "gguf", gguf_type="f32" if baseline else "auto", verify=False)
    return ExportDir(target).gguf


def file_type_name(gguf: Path) -> str:
    """The file type a GGUF declares (general.file_type), e.g. MOSTLY_Q4_K_M -> Q4_K_M."""
    import gguf as gguf_lib

    field = gguf_lib.GGUFReader(str(gguf)).get_field("general.file_type")
    if field is None:
        return "?"
    return gguf_lib.LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_").removeprefix("ALL_")


def measure_gguf(label: str, made_by: str, gguf: Path, base_logits: Path, text: Path, settings: BenchSettings,
                 threads: int, baseline: bool) -> LlamaCppRow:
    chunks = -1 if settings.windows is None else settings.windows
    if baseline:
        ppl = llamacpp_perplexity(gguf, text, CTX, chunks, threads, save_logits=base_logits)
        quality = {"ppl": ppl, "mean_kld": 0.0, "p99_kld": 0.0, "top1_agreement": 1.0}
    else:
        quality = llamacpp_divergence(gguf, base_logits, CTX, chunks, threads)
    speed = llamacpp_speed(gguf, settings.prompt, settings.decode, threads)
    size = gguf.stat().st_size
    return LlamaCppRow(model=label, made_by=made_by, gguf=str(gguf), file_mb=size / 2**20,
                       bits_per_weight=speed["weights_bytes"] * 8 / speed["parameters"], **quality,
                       prefill_tok_s=speed["prefill_tok_s"], decode_tok_s=speed["decode_tok_s"],
                       decode_tok_s_std=speed["decode_tok_s_std"], threads=threads, chunks=chunks)


def run_llamacpp(models: list[str], settings: BenchSettings, work: Path, threads: int = 2,
                 progress: Progress = NoProgress()) -> list[LlamaCppRow]:
    """Every model in llama.cpp; KLD against the first. `work` keeps the exports and the base's
    distributions (vocab x tokens x 2 bytes)."""
    if settings.windows == 0:
        raise SlimkitError("--runtime llamacpp scores ppl and KLD on the evaluation text: --windows must be >= 1")
    text = evaluation_text(work / "evaluation.txt")
    base_logits = work / "base.kld"
    rows = []
    for i, model in enumerate(progress.track(models, "llama.cpp")):
        progress.note(f"{model}: GGUF, llama-perplexity, llama-bench")
        gguf = gguf_of(model, work, baseline=i == 0)
        rows.append(measure_gguf(model, file_type_name(gguf), gguf, base_logits, text, settings, threads,
                                 baseline=i == 0))
    return rows


def llamacpp_table(rows: list[LlamaCppRow]) -> str:
    lines = ["| model | file type / made by | file MB | BPW | ppl | mean KLD | KLD p99 | top-1 | prefill tok/s | decode tok/s |",
             "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r.model} | {r.made_by} | {r.file_mb:.1f} | {r.bits_per_weight:.2f} | {r.ppl:.3f} | "
                     f"{r.mean_kld:.4f} | {r.p99_kld:.3f} | {r.top1_agreement:.1%} | {r.prefill_tok_s:.0f} | "
                     f"{r.decode_tok_s:.1f} ± {r.decode_tok_s_std:.1f} |")
    return "\n".join(lines)
