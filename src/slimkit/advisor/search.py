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

from slimkit.advisor.device import Device
from slimkit.advisor.framework import CANDIDATES, RULES, Candidate
from slimkit.progress import NoProgress, Progress


@dataclass(frozen=True)
class Constraints:
    max_ppl_increase: float = 0.10  # relative: 0.10 = +10%
    max_memory_mb: float | None = None  # peak RSS of the packed model, in its own process
    max_decode_ms: float | None = None  # batch-1 decode latency per token
    min_throughput: float | None = None  # tokens/s at the benchmark batch

    def check(self, row: dict, base: dict) -> dict[str, tuple[bool, str]]:
        inc = row["ppl"] / base["ppl"] - 1
        out = {"accuracy": (inc <= self.max_ppl_increase,
                            f"ppl {row['ppl']:.2f} vs dense {base['ppl']:.2f} ({inc:+.1%}, bound +{self.max_ppl_increase:.0%})")}
        out["memory"] = ((self.max_memory_mb is None or row["peak_rss_mb"] <= self.max_memory_mb),
                         f"peak RSS {row['peak_rss_mb']:.0f} MB" + (f" (budget {self.max_memory_mb:.0f})"
                                                                    if self.max_memory_mb else " (no budget)"))
        out["latency"] = ((self.max_decode_ms is None or row["decode_ms_per_token"] <= self.max_decode_ms),
                          f"decode {row['decode_ms_per_token']:.1f} ms/token" + (
                              f" (budget {self.max_decode_ms:.1f})" if self.max_decode_ms else " (no budget)"))
        out["throughput"] = ((self.min_throughput is None or row["throughput_tok_s"] >= self.min_throughput),
                             f"{row['throughput_tok_s']:.1f} tok/s @{row['batch']}" + (
                                 f" (needs {self.min_throughput:.1f})" if self.min_throughput else ""))
        return out


@dataclass(frozen=True)
class AdviseSettings:
    calibration_windows: int = 16
    calibration_seqlen: int = 256
    eval_windows: int = 16  # ppl windows of 512 for every measured candidate (200 = full protocol)
    decode_tokens: int = 32
    include_research: bool = False

    @classmethod
    def quick(cls) -> "AdviseSettings":
        return cls()

    @classmethod
    def full(cls) -> "AdviseSettings":
        return cls(calibration_windows=128, calibration_seqlen=512, eval_windows=200)


def pareto(rows: list[dict], keys: tuple[str, ...] = ("ppl", "decode_ms_per_token", "peak_rss_mb")) -> list[dict]:
    """Rows no other row beats on every key (lower is better) and strictly on one."""
    front = []
    for r in rows:
        dominated = any(all(o[k] <= r[k] for k in keys) and any(o[k] < r[k] for k in keys) for o in rows if o is not r)
        if not dominated:
            front.append(r)
    return front


def _reason(chosen: dict, rows: list[dict], base: dict, constraints: Constraints) -> str:
    rule = chosen["rule"]
    checks = constraints.check(chosen, base)
    earlier = [r for r in rows if r.get("rule") and r["order"] < chosen["order"]]
    lines = [f"Rule {rule} ({RULES[rule]}) applied: {chosen['candidate']} is the first candidate in the "
             f"framework's order that meets every constraint on this machine."]
    lines += [f"- {k}: {text}" for k, (_ok, text) in checks.items()]
    for r in earlier:
        failed = [f"{k}: {text}" for k, (ok, text) in constraints.check(r, base).items() if not ok]
        lines.append(f"- {r['candidate']} (rule {r['rule']}) came earlier but missed: " + "; ".join(failed))
    later = [r for r in rows if r.get("rule") and r["order"] > chosen["order"] and r.get("meets")]
    if later:
        fastest = min(later, key=lambda r: r["decode_ms_per_token"])
        lines.append(f"- not needed: {fastest['candidate']} (rule {fastest['rule']}) also meets the constraints and "
                     f"decodes at {fastest['decode_ms_per_token']:.1f} ms/token vs {chosen['decode_ms_per_token']:.1f}, "
                     f"with ppl {fastest['ppl']:.2f} vs {chosen['ppl']:.2f}; the framework goes further only when a "
                     "memory, latency or throughput budget asks for it (set one to let it)")
    return "\n".join(lines)


def decide(rows: list[dict], base: dict, constraints: Constraints) -> tuple[dict | None, str]:
    """The first candidate in the framework's order that meets every constraint, and why."""
    rows = sorted(rows, key=lambda r: r["order"])
    for r in rows:
        r["meets"] = all(ok for ok, _ in constraints.check(r, base).values())
    chosen = next((r for r in rows if r["meets"]), None)
    if chosen is None:
        near = sorted(rows, key=lambda r: r["ppl"])[:3]
        return None, ("No measured candidate meets every constraint. Closest on accuracy: "
                      + ", ".join(f"{r['candidate']} ({'; '.join(t for ok, t in constraints.check(r, base).values() if not ok)})"
                                  for r in near))
    return chosen, _reason(chosen, rows, base, constraints)


def _candidate_row(row: dict, order: int, c: Candidate) -> dict:
    return {**row, "candidate": c.name, "rule": c.rule, "order": order, "recipe": c.recipe, "pack": c.pack,
            "what": c.what}


def _plan(device: Device, settings: AdviseSettings) -> tuple[list[tuple[int, Candidate]], list[dict]]:
    """(the candidates to measure, in rule order; the ones skipped with their reasons). Rule 4 is
    decided later, once the quantized candidates are measured."""
    skipped, measured = [], []
    for order, c in enumerate(CANDIDATES):
        reason = c.skip_reason(device, None if c.rule == 4 else False, settings.include_research)
        if c.rule == 4 or not reason:
            measured.append((order, c))
        else:
            skipped.append({"candidate": c.name, "rule": c.rule, "reason": reason})
    return measured, skipped


def _write_advice(output: Path, overwrite: bool, model: str, result: dict, chosen: dict | None,
                  plotted: list[dict]) -> None:
    from slimkit.advisor.report import frontier_plot, markdown
    from slimkit.io.outputs import output_directory
    from slimkit.paths import MeasureDir
    from slimkit.recipes import get_recipe

    with output_directory(output, overwrite, inputs=[model], command="advise") as tmp:
        written = MeasureDir(tmp, "advise")
        written.json.write_text(json.dumps(result, indent=2, default=str))
        written.md.write_text(markdown(result))
        frontier_plot(plotted, written.frontier, model)
        if chosen is not None:
            recipe = get_recipe(chosen["recipe"])
            header = (f"# recommended by `slimkit advise {model}` ({chosen['candidate']}, rule {chosen['rule']}).\n"
                      f"# slimkit compress {model} -r recommended.yaml -o OUT"
                      + (f" && slimkit pack OUT -o OUT-packed --format {chosen['pack']}\n" if chosen["pack"] != "dense"
                         else "\n"))
            written.recommended.write_text(header + recipe.to_yaml())


def advise(model: str, constraints: Constraints, device: Device, output: Path,
           settings: AdviseSettings = AdviseSettings(), progress: Progress = NoProgress(),
           log: Callable[[str], None] = lambda m: None, overwrite: bool = False) -> dict:
    from slimkit.benchmarks import model as bench_model
    from slimkit.paths import MeasureDir
    from slimkit.pipeline import Variant, compress_pack_measure
    from slimkit.recipes import get_recipe
    from slimkit.workflow import EvalSettings

    output = Path(output).absolute()
    layout = MeasureDir(output, "advise")
    measured, skipped = _plan(device, settings)
    eval_settings = EvalSettings(max_windows=4, calibration_windows=settings.calibration_windows,
                                 calibration_seqlen=settings.calibration_seqlen)

    def run_candidates(cands: list[tuple[int, Candidate]]) -> list[dict]:
        variants = [Variant(c.name, get_recipe(c.recipe), c.pack) for _, c in cands]
        rows = compress_pack_measure(model, variants, layout.compressed, lambda v: layout.packed(v.label),
                                     eval_settings, progress, log, windows=settings.eval_windows,
                                     decode=settings.decode_tokens).rows
        return [_candidate_row(row, order, c) for (order, c), row in zip(cands, rows)]

    log("measuring the dense model")
    base = bench_model.measure_isolated(model, note=progress.note, windows=settings.eval_windows,
                                        decode=settings.decode_tokens)
    rows = run_candidates([(o, c) for o, c in measured if c.rule != 4])
    accurate = [r for r in rows if constraints.check(r, base)["accuracy"][0]]
    latency_missed = (constraints.max_decode_ms is not None
                      and not any(constraints.check(r, base)["latency"][0] for r in accurate))
    for order, c in [(o, c) for o, c in measured if c.rule == 4]:
        reason = c.skip_reason(device, latency_missed if constraints.max_decode_ms is not None else None,
                               settings.include_research)
        if reason:
            skipped.append({"candidate": c.name, "rule": c.rule, "reason": reason})
        else:
            rows += run_candidates([(order, c)])
    rows.sort(key=lambda r: r["order"])
    chosen, reason = decide(rows, base, constraints)  # sets "meets" on every row
    base_row = {**base, "candidate": "dense", "rule": 0, "order": -1, "recipe": None, "what": "the model as given"}
    bench_model.compare([base_row] + rows)
    front = pareto([base_row] + rows)
    for r in [base_row] + rows:
        r["pareto"] = r in front
        r["ppl_increase"] = r["ppl"] / base["ppl"] - 1
    result = {
        "model": model, "device": device.to_dict(), "constraints": asdict(constraints), "settings": asdict(settings),
        "baseline": base_row, "candidates": rows, "skipped": skipped,
        "recommended": chosen["candidate"] if chosen else None,
        "recommended_recipe": chosen["recipe"] if chosen else None,
        "recommended_pack": chosen["pack"] if chosen else None, "reason": reason,
    }
    _write_advice(output, overwrite, model, result, chosen, [base_row] + rows)
    return result
