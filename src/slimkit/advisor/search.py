"""`advise`: run the decision framework on measurements of this model on this machine.

Every candidate the device can run is compressed (small calibration), packed in its real format
and measured in its own process (ppl, decode latency, throughput, peak RSS, size). The
recommendation is the first candidate in the framework's order that meets every constraint, and
the reason names the rule and the measurements that decided it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from slimkit.advisor.device import Device
from slimkit.advisor.framework import CANDIDATES, RULES, Candidate
from slimkit.progress import NoProgress, Progress
from slimkit.protocol import QUICK, Protocol
from slimkit.results import AdviseResult, AdviseRow, BenchRow, SkippedCandidate


class Constraints(BaseModel):
    """What the user needs; the descriptions are `slimkit advise`'s option help."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_ppl_increase: float = Field(0.10, ge=0, description="largest acceptable perplexity increase: a fraction "
                                    "(0.1) or a percentage (10%)")
    max_memory_mb: float | None = Field(None, gt=0, description="peak RSS budget of the packed model, MB "
                                        "(measured in its own process)")
    max_decode_ms: float | None = Field(None, gt=0, description="batch-1 decode latency budget, ms/token")
    min_throughput: float | None = Field(None, gt=0, description="tokens/s needed at batch 8")
    max_kld: float | None = Field(None, gt=0, description="largest acceptable mean KL divergence from the dense "
                                  "model's next-token distributions (nats/token); also ranks near misses and the "
                                  "frontier by KLD instead of ppl")
    max_size: int | None = Field(None, gt=0, description="largest whole file the model may take (100MB, 1.5GB): the "
                                 "packed dir, or the GGUF with --target llamacpp, where an allocated GGUF of that "
                                 "size is measured too")

    @field_validator("max_size", mode="before")
    @classmethod
    def _size(cls, value):
        from slimkit.quantization.config import parse_size

        return parse_size(value) if value is not None else None

    @field_validator("max_ppl_increase", mode="before")
    @classmethod
    def _percent(cls, value):
        if isinstance(value, str) and value.strip().endswith("%"):
            return float(value.strip()[:-1]) / 100
        return value

    @property
    def quality_key(self) -> str:
        """The accuracy measure candidates are ranked by."""
        return "mean_kld" if self.max_kld is not None else "ppl"

    def check(self, row: BenchRow, base: BenchRow) -> dict[str, tuple[bool, str]]:
        inc = row.ppl / base.ppl - 1
        out = {"accuracy": (inc <= self.max_ppl_increase,
                            f"ppl {row.ppl:.2f} vs dense {base.ppl:.2f} ({inc:+.1%}, bound +{self.max_ppl_increase:.0%})")}
        if self.max_kld is not None:
            kld = row.mean_kld if row.mean_kld is not None else float("inf")
            ok, text = out["accuracy"]
            out["accuracy"] = (ok and kld <= self.max_kld, f"{text}; KLD {kld:.4f} (bound {self.max_kld:.4f})")
        out["memory"] = ((self.max_memory_mb is None or row.peak_rss_mb <= self.max_memory_mb),
                         f"peak RSS {row.peak_rss_mb:.0f} MB" + (f" (budget {self.max_memory_mb:.0f})"
                                                                    if self.max_memory_mb else " (no budget)"))
        out["latency"] = ((self.max_decode_ms is None or row.decode_ms_per_token <= self.max_decode_ms),
                          f"decode {row.decode_ms_per_token:.1f} ms/token" + (
                              f" (budget {self.max_decode_ms:.1f})" if self.max_decode_ms else " (no budget)"))
        size = row.disk_mb * 2**20
        out["size"] = ((self.max_size is None or size <= self.max_size),
                       f"file {size / 1e6:.1f} MB" + (f" (budget {self.max_size / 1e6:.1f})" if self.max_size else ""))
        out["throughput"] = ((self.min_throughput is None or row.throughput_tok_s >= self.min_throughput),
                             f"{row.throughput_tok_s:.1f} tok/s @{row.batch}" + (
                                 f" (needs {self.min_throughput:.1f})" if self.min_throughput else ""))
        return out


@dataclass(frozen=True)
class AdviseSettings:
    protocol: Protocol = QUICK  # calibration size and ppl windows of every measured candidate
    decode_tokens: int = 32
    include_research: bool = False
    overwrite: bool = False  # replace an earlier advise output (the output policy still applies)


def pareto(rows: list[AdviseRow], keys: tuple[str, ...] = ("ppl", "decode_ms_per_token", "peak_rss_mb")
           ) -> list[AdviseRow]:
    """Rows no other row beats on every key (lower is better) and strictly on one."""
    def values(r: AdviseRow) -> list[float]:
        return [float("inf") if getattr(r, k) is None else getattr(r, k) for k in keys]

    front = []
    for r in rows:
        mine = values(r)
        dominated = any(all(a <= b for a, b in zip(theirs, mine)) and any(a < b for a, b in zip(theirs, mine))
                        for theirs in (values(o) for o in rows if o is not r))
        if not dominated:
            front.append(r)
    return front


def _reason(chosen: AdviseRow, rows: list[AdviseRow], base: BenchRow, constraints: Constraints) -> str:
    rule = chosen.rule
    checks = constraints.check(chosen, base)
    earlier = [r for r in rows if r.rule and r.order < chosen.order]
    lines = [f"Rule {rule} ({RULES[rule]}) applied: {chosen.candidate} is the first candidate in the "
             f"framework's order that meets every constraint on this machine."]
    lines += [f"- {k}: {text}" for k, (_ok, text) in checks.items()]
    for r in earlier:
        failed = [f"{k}: {text}" for k, (ok, text) in constraints.check(r, base).items() if not ok]
        lines.append(f"- {r.candidate} (rule {r.rule}) came earlier but missed: " + "; ".join(failed))
    later = [r for r in rows if r.rule and r.order > chosen.order and r.meets]
    if later:
        fastest = min(later, key=lambda r: r.decode_ms_per_token)
        lines.append(f"- not needed: {fastest.candidate} (rule {fastest.rule}) also meets the constraints and "
                     f"decodes at {fastest.decode_ms_per_token:.1f} ms/token vs {chosen.decode_ms_per_token:.1f}, "
                     f"with ppl {fastest.ppl:.2f} vs {chosen.ppl:.2f}; the framework goes further only when a "
                     "memory, latency or throughput budget asks for it (set one to let it)")
    return "\n".join(lines)


def decide(rows: list[AdviseRow], base: BenchRow, constraints: Constraints) -> tuple[AdviseRow | None, str]:
    """The first candidate in the framework's order that meets every constraint, and why."""
    rows = sorted(rows, key=lambda r: r.order)
    for r in rows:
        r.meets = all(ok for ok, _ in constraints.check(r, base).values())
    chosen = next((r for r in rows if r.meets), None)
    if chosen is None:
        near = sorted(rows, key=lambda r: getattr(r, constraints.quality_key) or float("inf"))[:3]
        return None, ("No measured candidate meets every constraint. Closest on accuracy: "
                      + ", ".join(f"{r.candidate} ({'; '.join(t for ok, t in constraints.check(r, base).values() if not ok)})"
                                  for r in near))
    return chosen, _reason(chosen, rows, base, constraints)


def _candidate_row(row: BenchRow, order: int, c: Candidate) -> AdviseRow:
    return AdviseRow(**row.to_dict(), candidate=c.name, rule=c.rule, order=order, recipe=c.recipe, pack=c.pack,
                     what=c.what)


def _plan(device: Device, settings: AdviseSettings) -> tuple[list[tuple[int, Candidate]], list[SkippedCandidate]]:
    """(the candidates to measure, in rule order; the ones skipped with their reasons). Rule 4 is
    decided later, once the quantized candidates are measured."""
    skipped, measured = [], []
    for order, c in enumerate(CANDIDATES):
        reason = c.skip_reason(device, None if c.rule == 4 else False, settings.include_research)
        if c.rule == 4 or not reason:
            measured.append((order, c))
        else:
            skipped.append(SkippedCandidate(candidate=c.name, rule=c.rule, reason=reason))
    return measured, skipped


def _write_advice(output: Path, overwrite: bool, model: str, result: AdviseResult, chosen: AdviseRow | None,
                  plotted: list[AdviseRow]) -> None:
    from slimkit.advisor.llamacpp import ALLOCATED, allocated_recipe
    from slimkit.advisor.report import frontier_plot, markdown
    from slimkit.io.outputs import output_directory
    from slimkit.paths import MeasureDir
    from slimkit.recipes import get_recipe

    with output_directory(output, overwrite, inputs=[model], command="advise") as tmp:
        written = MeasureDir(tmp, "advise")
        written.json.write_text(json.dumps(result.to_dict(), indent=2, default=str))
        written.md.write_text(markdown(result))
        frontier_plot(plotted, written.frontier, model)
        if chosen is not None:
            recipe = allocated_recipe(result.constraints["max_size"]) if chosen.recipe == ALLOCATED \
                else get_recipe(chosen.recipe)
            then = {"dense": "\n", "gguf": " && slimkit export OUT --to gguf -o OUT-gguf\n"}.get(
                chosen.pack, f" && slimkit pack OUT -o OUT-packed --format {chosen.pack}\n")
            header = (f"# recommended by `slimkit advise {model}` ({chosen.candidate}, rule {chosen.rule}).\n"
                      f"# slimkit compress {model} -r recommended.yaml -o OUT" + then)
            written.recommended.write_text(header + recipe.to_yaml())


def _measure_torch(model: str, constraints: Constraints, device: Device, layout, settings: AdviseSettings,
                   progress: Progress, log: Callable[[str], None]
                   ) -> tuple[BenchRow, list[AdviseRow], list[SkippedCandidate]]:
    """Compress, pack and measure the candidates the device can run, in slimkit's own runtime."""
    from slimkit.pipeline import MeasurePlan, Variant, compress_pack_measure
    from slimkit.protocol import BenchSettings, EvalSettings
    from slimkit.recipes import get_recipe

    measured, skipped = _plan(device, settings)
    # the compress stage's own ppl is a 4-window sanity check; the benchmark measures the protocol's windows
    eval_settings = EvalSettings.from_protocol(settings.protocol.with_changes(eval_windows=4))
    bench = BenchSettings(windows=settings.protocol.eval_windows, decode=settings.decode_tokens, reference=model)

    def run_candidates(cands: list[tuple[int, Candidate]], base: BenchRow | None = None):
        variants = [Variant(c.name, get_recipe(c.recipe), c.pack) for _, c in cands]
        plan = MeasurePlan(variants, layout.compressed, lambda v: layout.packed(v.label), bench=bench)
        result = compress_pack_measure(model, plan, eval_settings, progress, log, measured_baseline=base)
        return result.baseline, [_candidate_row(row, order, c) for (order, c), row in zip(cands, result.rows)]

    base, rows = run_candidates([(o, c) for o, c in measured if c.rule != 4])
    accurate = [r for r in rows if constraints.check(r, base)["accuracy"][0]]
    latency_missed = (constraints.max_decode_ms is not None
                      and not any(constraints.check(r, base)["latency"][0] for r in accurate))
    for order, c in [(o, c) for o, c in measured if c.rule == 4]:
        reason = c.skip_reason(device, latency_missed if constraints.max_decode_ms is not None else None,
                               settings.include_research)
        if reason:
            skipped.append(SkippedCandidate(candidate=c.name, rule=c.rule, reason=reason))
        else:
            rows += run_candidates([(order, c)], base)[1]
    return base, rows, skipped


def _other_dense_rows(model: str, settings: AdviseSettings, progress: Progress) -> list[BenchRow]:
    """The dense model in its other dtypes worth timing on this machine (bf16 where the GEMM probe
    says it could be faster), timing only: the ratios' baseline, not candidates."""
    from slimkit.benchmarks import model as bench_model
    from slimkit.protocol import BenchSettings

    bench = BenchSettings(windows=0, decode=settings.decode_tokens)
    _, others = bench_model.dense_alternatives(model, bench, progress.note)
    return [bench_model.measure_isolated(m, s, note=progress.note) for m, s in others]


def advise(model: str, constraints: Constraints, device: Device, output: Path,
           settings: AdviseSettings = AdviseSettings(), progress: Progress = NoProgress(),
           log: Callable[[str], None] = lambda m: None) -> AdviseResult:
    """Measure the candidates on `device` (slimkit's runtime, or llama.cpp for kind "llamacpp"),
    recommend the first in the framework's order that meets every constraint, write the report."""
    from slimkit.benchmarks import model as bench_model
    from slimkit.paths import MeasureDir

    output = Path(output).absolute()
    layout = MeasureDir(output, "advise")
    if device.kind == "llamacpp":
        from slimkit.advisor import llamacpp

        base, rows = llamacpp.measure_candidates(model, layout.work, settings, device.cores, progress, log,
                                                 max_size=constraints.max_size)
        skipped = llamacpp.skipped()
    else:
        base, rows, skipped = _measure_torch(model, constraints, device, layout, settings, progress, log)
    rows.sort(key=lambda r: r.order)
    chosen, reason = decide(rows, base, constraints)  # sets "meets" on every row
    base_row = base if isinstance(base, AdviseRow) else AdviseRow(
        **base.to_dict(), candidate="dense", rule=0, order=-1, recipe=None, what="the model as given")
    if device.kind == "llamacpp":
        bench_model.compare([base_row] + rows)
    else:  # speed-ups against the fastest dense configuration here (fp32 or bf16), not fp32 alone
        bench_model.compare([base_row, *_other_dense_rows(model, settings, progress)] + rows, best_dense=True)
    front = pareto([base_row] + rows, (constraints.quality_key, "decode_ms_per_token", "peak_rss_mb"))
    for r in [base_row] + rows:
        r.pareto = r in front
        r.ppl_increase = r.ppl / base.ppl - 1
    result = AdviseResult(
        model=model, device=device.to_dict(), constraints=constraints.model_dump(), settings=asdict(settings),
        baseline=base_row, candidates=rows, skipped=skipped,
        recommended=chosen.candidate if chosen else None, recommended_recipe=chosen.recipe if chosen else None,
        recommended_pack=chosen.pack if chosen else None, reason=reason)
    _write_advice(output, settings.overwrite, model, result, chosen, [base_row] + rows)
    return result
