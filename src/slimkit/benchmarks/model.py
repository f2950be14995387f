"""`slimkit bench model`: latency, throughput, memory, size and quality of whole models.

Each model is measured in its own fresh process (so that peak RSS is that model's alone), one
after the other, in `rounds` rounds of alternating order (each timing keeps its fastest round, so
that a slow spell of a shared machine does not land on one model only); the table puts every ratio
against the first model (the baseline):

- prefill: one prompt of `prompt` tokens and one of `long_prompt`, batch 1 (ms, median of 3);
- decode: batch 1, ms per token with the KV cache (median over `decode` steps);
- throughput: `batch` sequences decoding together (tokens/s);
- peak RSS of the process, and bytes of the weights as held in RAM;
- size on disk of the weight files; ppl on the fixed protocol (`windows` windows of 512).

    slimkit bench model smollm2-135m runs/int4-packed --windows 16
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from slimkit.formats.gemm_dtype import bf16_is_a_candidate, probe_note
from slimkit.models.checks import ppl_seqlen
from slimkit.protocol import BenchSettings, windows_text
from slimkit.results import BenchRow


def _peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM belongs to the current address space; ru_maxrss would not
    do: Linux keeps it across exec, so a worker would inherit its (bigger) parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _weights_ram_bytes(model) -> int:
    from slimkit.formats import packed_layers

    packed = packed_layers(model)
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if any(name.startswith(p + ".") for p in packed) or t is None:
            continue
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total + sum(m.ram_bytes() for m in packed.values())


def _disk_bytes(loaded) -> int:
    from slimkit.evaluation.size import files_bytes

    # a .gguf source runs as the fp32 weights it was dequantized to (the cache dir): count those
    return files_bytes(loaded.hf_dir or loaded.source)


def _bits_per_weight(disk_bytes: int, parameters: int | None) -> float | None:
    return disk_bytes * 8 / parameters if parameters else None


def _parameters(loaded, model) -> int | None:
    """The model's own parameter count: a dense model's, or what its pack summary recorded (packed
    layers hold codes, not parameters); None for a pack made before the summary kept it."""
    from slimkit.paths import PackedDir

    summary = PackedDir(Path(loaded.hf_dir or loaded.source)).summary
    if summary.is_file():
        return json.loads(summary.read_text()).get("parameters")
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def measure(source: str, settings: BenchSettings = BenchSettings(), note=lambda text: None) -> BenchRow:
    """Everything about one model, in this process; `note` hears each phase as it starts."""
    from slimkit.data import load_split
    from slimkit.devices import resolve_device, synchronize
    from slimkit.evaluation import PerplexityProtocol, eval_windows, perplexity
    from slimkit.formats import packed_layers
    from slimkit.models import load_model

    prompt, decode, batch, windows = settings.prompt, settings.decode, settings.batch, settings.windows
    note(f"{source}: loading")
    loaded = load_model(source)
    device = resolve_device(settings.device)
    model, tok = in_dtype(loaded.model, settings.dtype, source).to(device), loaded.tokenizer
    split = load_split()
    seqlen = ppl_seqlen(model.config)
    all_windows = eval_windows(tok, split, seqlen)
    stream = all_windows[0].to(device)
    ids = stream[:prompt].unsqueeze(0)

    def step(tokens, past=None):
        out = model(input_ids=tokens, past_key_values=past, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        synchronize(device)
        return nxt, out.past_key_values

    long = min(settings.long_prompt, stream.shape[0])
    note(f"{source}: prefill {prompt}{f' and {long}' if long else ''} tokens, decode {decode}")
    prefill_ms, decode_ms = eager_latency(step, ids, decode)
    long_ms = median_prefill_ms(step, stream[:long].unsqueeze(0)) if long else None
    compiled = _compiled_decode(model, ids, decode, source, note) if settings.compiled else {}
    note(f"{source}: throughput at batch {batch}")
    rows = torch.stack([stream[i * 16 : i * 16 + 32] for i in range(batch)])
    nxt, past = step(rows)
    steps = max(decode // 2, 4)
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt, past = step(nxt, past)
    throughput = batch * steps / (time.perf_counter() - t0)
    if windows != 0:
        note(f"{source}: perplexity on {windows_text(windows)} windows")
    peak_mb = _peak_rss_mb()  # before any reference model is loaded below
    count = all_windows.shape[0] if windows is None else min(windows, all_windows.shape[0])
    use = _divergence_use(source, settings.reference, split, windows, count, note, seqlen)
    ppl = perplexity(model, tok, split, PerplexityProtocol(seqlen, windows), logprobs=use) if windows != 0 else None
    packed = packed_layers(model)
    paths = sorted({m.path_for(1) for m in packed.values()}) or [f"dense {DTYPE_LABELS[settings.dtype]} (torch.nn.Linear)"]
    divergence = (ppl.divergence or {}) if ppl else {}
    if use is not None and use.compare is None:  # this model is the reference: KL(P || P) = 0
        divergence = {"mean_kld": 0.0, "top1_agreement": 1.0}
    return BenchRow(
        model=row_label(source, settings.dtype), dtype=settings.dtype, prefill_ms=prefill_ms, prompt_tokens=prompt, decode_ms_per_token=decode_ms,
        long_prefill_ms=long_ms, long_prompt_tokens=long or None,
        throughput_tok_s=throughput, batch=batch, peak_rss_mb=peak_mb,
        weights_ram_mb=_weights_ram_bytes(model) / 2**20, disk_mb=_disk_bytes(loaded) / 2**20,
        bits_per_weight=_bits_per_weight(_disk_bytes(loaded), _parameters(loaded, model)),
        ppl=ppl.ppl if ppl else None, eval_tokens=ppl.tokens if ppl else 0,
        formats=sorted({m.format for m in packed.values()}), kernels_batch_1=paths,
        threads=torch.get_num_threads(), device=str(device), mean_kld=divergence.get("mean_kld"),
        top1_agreement=divergence.get("top1_agreement"), **compiled,
    )


DTYPE_LABELS = {"float32": "fp32", "bfloat16": "bf16"}


def row_label(source: str, dtype: str) -> str:
    return source if dtype == "float32" else f"{source} ({DTYPE_LABELS[dtype]})"


def in_dtype(model, dtype: str, source: str):
    """`model` computing in `dtype`: a dense model cast whole; a packed model only in fp32 (its
    layers' kernels choose their own arithmetic)."""
    from slimkit.errors import SlimkitError
    from slimkit.formats import packed_layers

    if dtype == "float32":
        return model
    if packed_layers(model):
        raise SlimkitError(f"{source}: a packed model is benchmarked as packed (its kernels choose their "
                           f"arithmetic); computing in {dtype} applies to dense models")
    return model.to(getattr(torch, dtype))


def bpw_cell(bits_per_weight: float | None) -> str:
    return f"{bits_per_weight:.2f}" if bits_per_weight is not None else "-"


def median_prefill_ms(step, ids: torch.Tensor, repeats: int = 3) -> float:
    """Median ms of `repeats` prefills of `ids` (batch 1, a fresh KV cache each time)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(ids)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def eager_latency(step, ids: torch.Tensor, decode: int) -> tuple[float, float]:
    """(median prefill ms of the prompt, median ms per decode step) with the dynamic KV cache, eager."""
    step(ids[:, :16])  # warm-up: kernels, allocator
    prefill_ms = median_prefill_ms(step, ids)
    nxt, past = step(ids)
    times = []
    for _ in range(decode):
        t0 = time.perf_counter()
        nxt, past = step(nxt, past)
        times.append(time.perf_counter() - t0)
    return prefill_ms, statistics.median(times) * 1e3


def _compiled_decode(model, ids, decode: int, source: str, note) -> dict:
    """Decode timed over a static KV cache with torch.compile (BenchRow's compiled fields); a
    model the compiler cannot take gets its reason instead of numbers."""
    from slimkit.generation import StaticDecoder

    note(f"{source}: compiling the decode step (static KV cache, torch.compile), then {decode} steps")
    try:
        steps = StaticDecoder(model, ids.shape[1] + decode + 2, compiled=True).generate(ids, decode + 2).steps
    except Exception as exc:  # noqa: BLE001 - any compiler failure is a result to report, not a crash
        return {"compiled_error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
    return {"compiled_decode_ms_per_token": steps.median_ms, "compile_s": steps.compile_s}


def _divergence_use(source: str, reference: str | None, split, windows: int | None, count: int, note,
                    seqlen: int):
    """Record the reference's distributions when `source` is the reference; else compare with
    them, computing the ones not cached yet (after the timings and the peak RSS were taken)."""
    from slimkit.evaluation import PerplexityProtocol, perplexity
    from slimkit.evaluation.divergence import BaseLogprobs
    from slimkit.evaluation.perplexity import LogprobsUse
    from slimkit.models import cache_root, load_model, resolve

    if reference is None or windows == 0:
        return None
    store = BaseLogprobs.for_model(cache_root(), resolve(reference)[0], split.split_hash, seqlen)
    if resolve(source)[0] == resolve(reference)[0]:
        return LogprobsUse(record=store)
    if not all(store.has(i) for i in range(count)):
        note(f"{reference}: the reference's distributions for the KL divergence")
        base = load_model(reference)
        perplexity(base.model, base.tokenizer, split, PerplexityProtocol(seqlen, windows),
                   logprobs=LogprobsUse(record=store))
    return LogprobsUse(compare=store)


PROGRESS_PREFIX = "slimkit-progress: "


def measure_isolated(source: str, settings: BenchSettings = BenchSettings(), note=None) -> BenchRow:
    """`measure` in a fresh Python process: its peak RSS is this model's alone. The worker's
    phase lines go to `note` as they happen (a long benchmark is never silent)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        args = [sys.executable, "-m", "slimkit.benchmarks.model", "--worker", str(out),
                "--settings", settings.model_dump_json(), source]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        errors = []
        for line in proc.stderr:
            if line.startswith(PROGRESS_PREFIX):
                if note is not None:
                    note(line[len(PROGRESS_PREFIX):].rstrip())
            else:
                errors.append(line)
        if proc.wait():
            from slimkit.errors import SlimkitError

            raise SlimkitError(f"benchmarking {source} failed:\n{''.join(errors).strip()[-2000:]}")
        return BenchRow.from_dict(json.loads(out.read_text()))


def compare(rows: list[BenchRow], best_dense: bool = False) -> list[BenchRow]:
    """Sets each row's ratios against the baseline: the first row, or with `best_dense` the fastest
    dense row of each measurement (decode: eager or compiled, whichever is faster); returns the rows."""
    base = _baseline(rows, best_dense)
    for r in rows:
        r.decode_speedup = base["decode"][0] / r.decode_ms_per_token
        r.prefill_speedup = base["prefill"][0] / r.prefill_ms
        if r.long_prefill_ms is not None and base["long prefill"][0] is not None:
            r.long_prefill_speedup = base["long prefill"][0] / r.long_prefill_ms
        r.throughput_ratio = r.throughput_tok_s / base["throughput"][0]
        if r.compiled_decode_ms_per_token is not None:
            r.compiled_decode_speedup = base["decode"][0] / r.compiled_decode_ms_per_token
    if best_dense:
        rows[0].baseline = {k: label for k, (_, label) in base.items() if label}
    return rows


def _baseline(rows: list[BenchRow], best_dense: bool) -> dict[str, tuple[float | None, str]]:
    """measurement -> (the baseline's value, which row and path gave it). The dense configurations are
    the first model's own rows (fp32, bf16); another dense model in the list is a candidate, not a baseline."""
    first = rows[0]
    dense = [r for r in rows if r.model == row_label(first.model, r.dtype)] if best_dense and not first.formats else []
    if not dense:
        return {"decode": (first.decode_ms_per_token, ""), "prefill": (first.prefill_ms, ""),
                "long prefill": (first.long_prefill_ms, ""), "throughput": (first.throughput_tok_s, "")}
    decodes = [(r.decode_ms_per_token, f"{r.model}, eager") for r in dense]
    decodes += [(r.compiled_decode_ms_per_token, f"{r.model}, compiled") for r in dense
                if r.compiled_decode_ms_per_token is not None]
    longs = [(r.long_prefill_ms, r.model) for r in dense if r.long_prefill_ms is not None]
    return {"decode": min(decodes), "prefill": min((r.prefill_ms, r.model) for r in dense),
            "long prefill": min(longs) if longs else (None, ""),
            "throughput": max((r.throughput_tok_s, r.model) for r in dense)}


def table(rows: list[BenchRow]) -> str:
    compiled = any(r.compiled_decode_ms_per_token is not None or r.compiled_error for r in rows)
    llama = any(r.llamacpp_file_type is not None or r.llamacpp_error for r in rows)
    long = rows[0].long_prefill_ms is not None
    head = ("| model | formats | decode ms/tok | decode x | "
            + ("compiled ms/tok | compiled x | compile s | " if compiled else "")
            + ("llama.cpp file | llama.cpp decode tok/s | slimkit / llama.cpp | " if llama else "")
            + f"prefill@{rows[0].prompt_tokens} ms | prefill x | "
            + (f"prefill@{rows[0].long_prompt_tokens} ms | prefill x | " if long else "")
            + "tok/s @batch | RSS MB | weights MB | disk MB | bpw | ppl | KLD | top-1 "
            "| kernel at batch 1 |")
    lines = [head, "|" + "---|" * (15 + 3 * compiled + 3 * llama + 2 * long)]
    for r in rows:
        ppl = f"{r.ppl:.2f}" if r.ppl is not None else "-"
        kld = f"{r.mean_kld:.4f} | {r.top1_agreement:.1%}" if r.mean_kld is not None else "- | -"
        lines.append(
            f"| {r.model}{'' if r.device == 'cpu' else f' ({r.device})'} | {','.join(r.formats) or 'dense'} | {r.decode_ms_per_token:.1f} | "
            f"{r.decode_speedup:.2f}x | {compiled_cells(r, compiled)}{llamacpp_cells(r, llama)}{r.prefill_ms:.0f} | "
            f"{r.prefill_speedup:.2f}x | {long_prefill_cells(r, long)}{r.throughput_tok_s:.1f} @{r.batch} | {r.peak_rss_mb:.0f} | {r.weights_ram_mb:.0f} | "
            f"{r.disk_mb:.0f} | {bpw_cell(r.bits_per_weight)} | {ppl} | {kld} | {'; '.join(r.kernels_batch_1)} |")
    notes = baseline_notes(rows[0])
    notes += [amortisation(r) for r in rows if r.compile_s is not None or r.compiled_error]
    notes += [f"- {r.model}: no llama.cpp numbers ({r.llamacpp_error})" for r in rows if r.llamacpp_error]
    if llama:
        notes.append(f"- slimkit / llama.cpp: slimkit's decode tokens/s (compiled where it ran, else eager) over "
                     f"llama-bench's, both at {rows[0].threads} threads in this run")
    return "\n".join(lines + ([""] + notes if notes else []))


def baseline_notes(first: BenchRow) -> list[str]:
    """Which dense row (and path) each ratio is against, and the CPU's fp32 vs bf16 probe."""
    notes = [probe_note(first.gemm_probe)] if first.gemm_probe else []
    if first.baseline:
        against = "; ".join(f"{what}: {label}" for what, label in first.baseline.items())
        notes.append(f"- every x is against the fastest dense configuration of that measurement ({against})")
    return notes


def slimkit_decode_tok_s(r: BenchRow) -> float:
    """The row's best batch-1 decode speed: compiled when it ran, else eager."""
    ms = min(x for x in (r.decode_ms_per_token, r.compiled_decode_ms_per_token) if x is not None)
    return 1e3 / ms


def llamacpp_cells(r: BenchRow, shown: bool) -> str:
    """The llama.cpp columns of one row ('' when the table has none)."""
    if not shown:
        return ""
    if r.llamacpp_decode_tok_s is None:
        return "- | - | - | "
    return (f"{r.llamacpp_file_type} | {r.llamacpp_decode_tok_s:.1f} | "
            f"{slimkit_decode_tok_s(r) / r.llamacpp_decode_tok_s:.2f}x | ")


def long_prefill_cells(r: BenchRow, shown: bool) -> str:
    """The long-prefill columns of one row ('' when the table has none)."""
    if not shown:
        return ""
    if r.long_prefill_speedup is None:
        return "- | - | "
    return f"{r.long_prefill_ms:.0f} | {r.long_prefill_speedup:.2f}x | "


def compiled_cells(r: BenchRow, shown: bool) -> str:
    """The compiled columns of one row ('' when the table has none)."""
    if r.compiled_decode_ms_per_token is not None:
        return f"{r.compiled_decode_ms_per_token:.1f} | {r.compiled_decode_speedup:.2f}x | {r.compile_s:.0f} | "
    return ("failed | - | - | " if r.compiled_error else "- | - | - | ") if shown else ""


def amortisation(r: BenchRow) -> str:
    """When compiling pays for itself against the same model's eager decode, in tokens."""
    if r.compiled_error:
        return f"- {r.model}: compiled decode failed ({r.compiled_error}); eager only"
    saved_ms = r.decode_ms_per_token - r.compiled_decode_ms_per_token
    if saved_ms <= 0:
        return f"- {r.model}: compiled decode is not faster than eager; the {r.compile_s:.0f} s compile never pays off"
    return (f"- {r.model}: the {r.compile_s:.0f} s compile pays off after {r.compile_s * 1e3 / saved_ms:,.0f} "
            f"generated tokens (not amortised in a shorter generation)")


def with_reference(settings: BenchSettings, baseline: str) -> BenchSettings:
    """The KL divergence is measured against the baseline unless another reference was named."""
    return settings if settings.reference else settings.model_copy(update={"reference": baseline})


def run(models: list[str], settings: BenchSettings = BenchSettings(), progress=None) -> list[BenchRow]:
    """Each model in its own process, in order, then `settings.rounds - 1` more timing rounds
    (reversed order every other round, no ppl); ratios and KLD against the first model."""
    settings = with_reference(settings, models[0])
    note = progress.note if progress is not None else None
    entries = [(m, settings) for m in models]
    probe, others = dense_alternatives(models[0], settings, note) if settings.best_dense else (None, [])
    entries += others
    order = [(r, i) for r in range(settings.rounds) for i in (range(len(entries)) if r % 2 == 0
                                                           else reversed(range(len(entries))))]
    if progress is not None:
        order = progress.track(order, "bench model")
    rows: list[BenchRow | None] = [None] * len(entries)
    for r, i in order:
        model, given = entries[i]
        row = measure_isolated(model, given.model_copy(update={"windows": 0, "reference": None}) if r else given, note)
        rows[i] = row if rows[i] is None else fastest_of(rows[i], row)
    rows = compare(rows, settings.best_dense)
    rows[0].gemm_probe = probe
    return rows


def is_dense_source(source: str) -> bool:
    """A model `bench model` can cast to bf16: anything but a packed dir."""
    from slimkit.paths import PackedDir

    return not PackedDir(Path(source)).weights.is_file()


def dense_alternatives(baseline: str, settings: BenchSettings, note=None
                       ) -> tuple[dict | None, list[tuple[str, BenchSettings]]]:
    """The GEMM probe, and the baseline's other dense configurations worth timing here (bf16 where
    the probe says it could win, always on a GPU), as (model, settings) to measure; timing only."""
    probe = dense_dtype_probe(baseline, settings, note)
    if (probe is None or bf16_is_a_candidate(probe)) and is_dense_source(baseline):
        return probe, [(baseline, settings.model_copy(update={"dtype": "bfloat16", "windows": 0, "reference": None}))]
    return probe, []


def dense_dtype_probe(baseline: str, settings: BenchSettings, note) -> dict | None:
    """fp32 vs bf16 GEMM on this CPU (None on a GPU, where bf16 is always timed)."""
    from slimkit.devices import resolve_device
    from slimkit.formats.gemm_dtype import gemm_probe

    if resolve_device(settings.device).type != "cpu" or not is_dense_source(baseline):
        return None
    if note is not None:
        note("dense dtype: timing one GEMM in fp32 and bf16 on this CPU (once per CPU and torch)")
    return gemm_probe()


def fastest_of(first: BenchRow, other: BenchRow) -> BenchRow:
    """`first` (with its ppl, KLD and peak RSS), each timing the faster of the two rounds."""
    def least(a, b):
        return b if a is None else a if b is None else min(a, b)

    return first.model_copy(update={
        "prefill_ms": min(first.prefill_ms, other.prefill_ms),
        "long_prefill_ms": least(first.long_prefill_ms, other.long_prefill_ms),
        "decode_ms_per_token": min(first.decode_ms_per_token, other.decode_ms_per_token),
        "compiled_decode_ms_per_token": least(first.compiled_decode_ms_per_token,
                                              other.compiled_decode_ms_per_token),
        "compile_s": least(first.compile_s, other.compile_s),
        "throughput_tok_s": max(first.throughput_tok_s, other.throughput_tok_s)})


def main(argv=None) -> None:
    """The worker `measure_isolated` starts (people use `slimkit bench model`)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="zoo name, HF dir, packed dir or .gguf")
    p.add_argument("--worker", required=True, help="write the row here, as JSON")
    p.add_argument("--settings", type=BenchSettings.model_validate_json, default=BenchSettings())
    args = p.parse_args(argv)

    def note(text: str) -> None:
        print(PROGRESS_PREFIX + text, file=sys.stderr, flush=True)

    Path(args.worker).write_text(json.dumps(measure(args.model, args.settings, note).to_dict()))


if __name__ == "__main__":
    main()
