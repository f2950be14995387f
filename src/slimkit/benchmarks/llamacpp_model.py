"""`slimkit bench model --runtime llamacpp`: GGUF files measured where they are deployed.

Each model is a .gguf, a `slimkit export --to gguf` dir, or any model slimkit can export (it is
exported first: the baseline as F32, the others with `--gguf-type auto`, which keeps the codes
compression chose). llama.cpp's own tools measure everything: `llama-bench` prefill and decode
tokens/s at the given thread count, `llama-perplexity` ppl on the evaluation text and the KL
divergence from the baseline's distributions (saved once, --kl-divergence-base) with top-1
agreement. llama-perplexity's threads sleep between operations (OMP_WAIT_POLICY=PASSIVE); llama-bench's
spin, as llama.cpp runs by default.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from slimkit.benchmarks.llamacpp import llamacpp_divergence, llamacpp_perplexity, llamacpp_speed
from slimkit.errors import SlimkitError
from slimkit.paths import ExportDir
from slimkit.progress import NoProgress, Progress
from slimkit.protocol import BenchSettings
from slimkit.results import BenchRow, LlamaCppRow

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
    from slimkit.export.job import ExportSettings, export_model

    target = work / f"export-{len(list(work.glob('export-*')))}"
    export_model(source, target, "gguf", ExportSettings(gguf_type="f32" if baseline else "auto", verify=False))
    return ExportDir(target).gguf


def file_type_name(gguf: Path) -> str:
    """The file type a GGUF declares (general.file_type), e.g. MOSTLY_Q4_K_M -> Q4_K_M."""
    import gguf as gguf_lib

    field = gguf_lib.GGUFReader(str(gguf)).get_field("general.file_type")
    if field is None:
        return "?"
    return gguf_lib.LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_").removeprefix("ALL_")


def gguf_quality(gguf: Path, base_logits: Path, text: Path, chunks: int, threads: int, baseline: bool) -> dict:
    """ppl and divergence from the baseline (the baseline itself saves its distributions)."""
    if baseline:
        ppl = llamacpp_perplexity(gguf, text, CTX, chunks, threads, save_logits=base_logits)
        return {"ppl": ppl, "mean_kld": 0.0, "p99_kld": 0.0, "top1_agreement": 1.0}
    return llamacpp_divergence(gguf, base_logits, CTX, chunks, threads)


def interleaved_speed(ggufs: list[Path], settings: BenchSettings, threads: int, rounds: int = 3) -> list[dict]:
    """llama-bench of every file, `rounds` times in turn (file 1, 2, ..., 1, 2, ...), so that a slow
    spell of the machine hits every file alike; tok/s: the fastest round (as `bench model`'s torch
    rows keep theirs) and the spread over the rounds."""
    runs: list[list[dict]] = [[] for _ in ggufs]
    for _ in range(rounds):
        for i, gguf in enumerate(ggufs):
            runs[i].append(llamacpp_speed(gguf, settings.prompt, settings.decode, threads))
    out = []
    for r in runs:
        decode = [x["decode_tok_s"] for x in r]
        out.append({"prefill_tok_s": max(x["prefill_tok_s"] for x in r), "decode_tok_s": max(decode),
                    "decode_tok_s_std": statistics.stdev(decode) if len(r) > 1 else r[0]["decode_tok_s_std"],
                    "weights_bytes": r[0]["weights_bytes"], "parameters": r[0]["parameters"],
                    "repack": all(x["repack"] for x in r)})
    return out


def gguf_row(label: str, made_by: str, gguf: Path, quality: dict, speed: dict, threads: int, chunks: int
             ) -> LlamaCppRow:
    return LlamaCppRow(model=label, made_by=made_by, gguf=str(gguf), file_mb=gguf.stat().st_size / 2**20,
                       bits_per_weight=speed["weights_bytes"] * 8 / speed["parameters"], **quality,
                       prefill_tok_s=speed["prefill_tok_s"], decode_tok_s=speed["decode_tok_s"],
                       decode_tok_s_std=speed["decode_tok_s_std"], threads=threads, chunks=chunks,
                       repack=speed["repack"])


def measure_all(entries: list[tuple[str, str, Path]], work: Path, settings: BenchSettings, threads: int,
                rounds: int = 3, progress: Progress = NoProgress()) -> list[LlamaCppRow]:
    """(label, made by, gguf) entries, the first being the baseline: quality one by one, speed in
    interleaved rounds."""
    if settings.windows == 0:
        raise SlimkitError("llama.cpp scores ppl and KLD on the evaluation text: --windows must be >= 1")
    chunks = -1 if settings.windows is None else settings.windows
    text, base_logits = evaluation_text(work / "evaluation.txt"), work / "base.kld"
    qualities = []
    for i, (_, _, gguf) in enumerate(progress.track(entries, "llama-perplexity")):
        qualities.append(gguf_quality(gguf, base_logits, text, chunks, threads, baseline=i == 0))
    progress.note(f"llama-bench: {rounds} rounds over {len(entries)} files")
    speeds = interleaved_speed([g for _, _, g in entries], settings, threads, rounds)
    base_logits.unlink(missing_ok=True)  # vocab x tokens x 2 bytes
    return [gguf_row(label, made_by, gguf, q, sp, threads, chunks)
            for (label, made_by, gguf), q, sp in zip(entries, qualities, speeds)]


def run_llamacpp(models: list[str], settings: BenchSettings, work: Path, threads: int = 2,
                 progress: Progress = NoProgress()) -> list[LlamaCppRow]:
    """Every model in llama.cpp; KLD against the first. `work` keeps the exports."""
    entries = []
    for i, model in enumerate(progress.track(models, "GGUF files")):
        gguf = gguf_of(model, work, baseline=i == 0)
        entries.append((model, file_type_name(gguf), gguf))
    return measure_all(entries, work, settings, threads, progress=progress)


def llamacpp_table(rows: list[LlamaCppRow]) -> str:
    lines = ["| model | file type / made by | file MB | BPW | ppl | mean KLD | KLD p99 | top-1 | prefill tok/s | decode tok/s |",
             "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r.model} | {r.made_by} | {r.file_mb:.1f} | {r.bits_per_weight:.2f} | {r.ppl:.3f} | "
                     f"{r.mean_kld:.4f} | {r.p99_kld:.3f} | {r.top1_agreement:.1%} | {r.prefill_tok_s:.0f} | "
                     f"{r.decode_tok_s:.1f} ± {r.decode_tok_s_std:.1f} |")
    if not all(r.repack for r in rows):
        lines.append("\nllama-bench crashed with weight repacking on (the AVX-512/AMX repack path) and was run with "
                     "`--repack 0`: these speeds are llama.cpp's without repacking.")
    return "\n".join(lines)


def add_llamacpp_columns(rows: list[BenchRow], models: list[str], settings: BenchSettings, work: Path,
                         progress: Progress = NoProgress()) -> list[BenchRow]:
    """The llama.cpp columns of `bench model`: each model's GGUF (the baseline as F32, the others
    as their own codes: packed int4 -> Q4_0/Q4_1, int8 -> Q8_0) timed by llama-bench in interleaved
    rounds at the thread count the torch rows ran with; a model without a GGUF gets the reason."""
    entries = []
    for i, (model, row) in enumerate(zip(models, progress.track(rows, "GGUF files for llama.cpp"))):
        try:
            gguf = gguf_of(model, work, baseline=i == 0)
        except SlimkitError as exc:
            row.llamacpp_error = str(exc).strip().splitlines()[0][:200]
            continue
        row.llamacpp_file_type = file_type_name(gguf)
        entries.append((row, gguf))
    if entries:
        progress.note(f"llama-bench: 3 rounds over {len(entries)} files at {rows[0].threads} threads")
        speeds = interleaved_speed([gguf for _, gguf in entries], settings, rows[0].threads)
        for (row, _), speed in zip(entries, speeds):
            row.llamacpp_decode_tok_s, row.llamacpp_prefill_tok_s = speed["decode_tok_s"], speed["prefill_tok_s"]
    return rows
