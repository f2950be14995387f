"""`advise --target llamacpp`: the decision framework on measurements taken in llama.cpp.

The candidates are GGUF file types (framework.LLAMACPP_CANDIDATES, most bits first), each
compressed by the gguf_quantize step (GPTQ on llama.cpp's grids) and exported; the dense model is
exported as F32. llama.cpp's own tools measure them (benchmarks/llamacpp_model.py): ppl and KL
divergence from the F32 file, prefill and decode speed. The rows are cast into the advisor's
rows so that the same constraints, order and report apply, with llama.cpp's meanings:
decode ms/token = 1000 / llama-bench's decode tok/s; memory = the GGUF file (llama.cpp maps
it: the weights' resident size, without the KV cache); throughput = batch-1 decode tok/s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from slimkit.advisor.framework import LLAMACPP_CANDIDATES, LLAMACPP_SKIPPED, Candidate
from slimkit.progress import NoProgress, Progress
from slimkit.results import AdviseRow, LlamaCppRow, SkippedCandidate


def advise_row(row: LlamaCppRow, prompt: int, order: int, c: Candidate | None) -> AdviseRow:
    """A llama.cpp measurement as an advisor row (see the module's note on meanings)."""
    return AdviseRow(
        model=row.model, prefill_ms=prompt / row.prefill_tok_s * 1e3, prompt_tokens=prompt,
        decode_ms_per_token=1e3 / row.decode_tok_s, throughput_tok_s=row.decode_tok_s, batch=1,
        peak_rss_mb=row.file_mb, weights_ram_mb=row.file_mb, disk_mb=row.file_mb, ppl=row.ppl,
        bits_per_weight=row.bits_per_weight,
        eval_tokens=max(row.chunks, 0) * 256, formats=[row.made_by], kernels_batch_1=[f"llama.cpp {row.made_by}"],
        threads=row.threads, mean_kld=row.mean_kld, top1_agreement=row.top1_agreement,
        candidate=c.name if c else "dense", rule=c.rule if c else 0, order=order, recipe=c.recipe if c else None,
        pack=c.pack if c else None, what=c.what if c else "the model as given, F32 GGUF")


ALLOCATED = "gguf-allocated"  # the candidate whose types are allocated to --max-size


def allocated_recipe(max_size: int):
    """gguf_allocate to a whole GGUF of `max_size` bytes."""
    from slimkit.recipes import parse_recipe

    return parse_recipe({"name": ALLOCATED, "description": f"GGML types allocated tensor by tensor to a "
                         f"{max_size / 1e6:.1f} MB GGUF", "steps": [{"method": "gguf_allocate", "target_size": max_size}]})


def candidates(max_size: int | None) -> tuple[Candidate, ...]:
    """llama.cpp's file types, after a GGUF allocated to the size budget when there is one."""
    if max_size is None:
        return LLAMACPP_CANDIDATES
    allocated = Candidate(ALLOCATED, 2, ALLOCATED, "gguf", f"slimkit's GGML types chosen tensor by tensor for "
                          f"{max_size / 1e6:.1f} MB (gguf_allocate)")
    return (allocated, *LLAMACPP_CANDIDATES)


def measure_candidates(model: str, work: Path, settings, threads: int, progress: Progress = NoProgress(),
                       log: Callable[[str], None] = lambda m: None, max_size: int | None = None
                       ) -> tuple[AdviseRow, list[AdviseRow]]:
    """Compress every candidate (an allocated GGUF too, given a size), export each (and the dense
    model) to GGUF, measure in llama.cpp with `threads` threads."""
    from slimkit.benchmarks.llamacpp_model import file_type_name, gguf_of, measure_all
    from slimkit.compression.job import CompressJob
    from slimkit.pipeline import compress_stage
    from slimkit.protocol import BenchSettings, EvalSettings
    from slimkit.recipes import get_recipe

    eval_settings = EvalSettings.from_protocol(settings.protocol.with_changes(eval_windows=4))
    chosen = candidates(max_size)
    recipes = [allocated_recipe(max_size) if c.recipe == ALLOCATED else get_recipe(c.recipe) for c in chosen]
    log(f"compressing {len(recipes)} GGUF candidates: {', '.join(r.name for r in recipes)}")
    job = CompressJob(model, tuple(recipes), work / "compressed", eval_settings, overwrite=True)
    layout, _ = compress_stage(job, progress, log)
    ggufs = work / "gguf"
    ggufs.mkdir(parents=True, exist_ok=True)
    entries = [(model, "F32", gguf_of(model, ggufs, baseline=True))]
    for c in chosen:
        gguf = gguf_of(str(layout.model_dir(c.recipe).root), ggufs, baseline=False)
        entries.append((c.name, file_type_name(gguf), gguf))
    bench = BenchSettings(windows=settings.protocol.eval_windows or 32, decode=settings.decode_tokens)
    log("measuring every GGUF in llama.cpp (llama-perplexity, then llama-bench in interleaved rounds)")
    rows = measure_all(entries, ggufs, bench, threads, rounds=2, progress=progress)
    base = advise_row(rows[0], bench.prompt, -1, None)
    return base, [advise_row(r, bench.prompt, i, c) for i, (r, c) in enumerate(zip(rows[1:], chosen))]


def skipped() -> list[SkippedCandidate]:
    """The framework's rules llama.cpp gives nothing to measure for, with the reason."""
    return [SkippedCandidate(candidate=f"rule {rule}", rule=rule, reason=reason)
            for rule, reason in LLAMACPP_SKIPPED.items()]
