"""The advisor's decision logic, `slimkit advise` end to end, the HTML report, reproduce verdicts."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from slimkit.advisor import CANDIDATES, Constraints, Device, pareto
from slimkit.advisor.reproduce import range_verdict, ratio_verdict
from slimkit.advisor.search import decide
from slimkit.protocol import QUICK
from slimkit.results import AdviseRow, BenchRow, CompressReport, ModelSection, Quality

CPU = Device("cpu", "test cpu", 2, ("avx2",))
GPU = Device("cuda", "test gpu", 8, (), (9, 0))
TINY = QUICK.with_changes(name="tiny", calibration_windows=2, calibration_seqlen=32, eval_windows=2)


def _row(name, order, rule, ppl, ms, rss=300.0, tps=50.0):
    return AdviseRow(candidate=name, order=order, rule=rule, ppl=ppl, decode_ms_per_token=ms, peak_rss_mb=rss,
                     throughput_tok_s=tps, batch=8, model=name, prefill_ms=1.0, prompt_tokens=16,
                     weights_ram_mb=rss / 2, disk_mb=rss / 2, eval_tokens=100, formats=[], kernels_batch_1=[],
                     threads=2, recipe=None, what="test row")


BASE = _row("dense", -1, 0, 10.0, 60.0, 900.0, 20.0)


def test_pareto_keeps_only_undominated_rows():
    rows = [BASE, _row("a", 0, 1, 10.1, 30, 500), _row("b", 1, 2, 10.9, 20, 300), _row("c", 2, 2, 11.5, 25, 350)]
    assert [r.candidate for r in pareto(rows)] == ["dense", "a", "b"]


def test_first_candidate_in_framework_order_that_meets_every_constraint_wins():
    rows = [_row("int8", 0, 1, 10.05, 30, 500), _row("gptq-int4", 2, 2, 10.8, 20, 300)]
    chosen, reason = decide(rows, BASE, Constraints(max_ppl_increase=0.10))
    assert chosen.candidate == "int8" and reason.startswith("Rule 1")
    assert "not needed: gptq-int4" in reason  # the faster one is named, and why it was not picked
    chosen, reason = decide(rows, BASE, Constraints(max_ppl_increase=0.10, max_decode_ms=25))
    assert chosen.candidate == "gptq-int4" and reason.startswith("Rule 2")
    assert "int8 (rule 1) came earlier but missed: latency: decode 30.0 ms/token (budget 25.0)" in reason
    chosen, reason = decide(rows, BASE, Constraints(max_ppl_increase=0.05, max_decode_ms=25))
    assert chosen is None and "No measured candidate" in reason


def test_a_kld_bound_ranks_and_decides_by_kld():
    """With --max-kld, accuracy also needs the KL divergence in bound; near misses and the frontier
    are ranked by KLD (ppl can hide a changed distribution)."""
    base = BASE.model_copy(update={"mean_kld": 0.0})
    int8 = _row("int8", 0, 1, 10.05, 30, 500).model_copy(update={"mean_kld": 0.004})
    gptq = _row("gptq-int4", 2, 2, 10.3, 20, 300).model_copy(update={"mean_kld": 0.05})
    rtn = _row("rtn-int4", 4, 2, 10.2, 20, 300).model_copy(update={"mean_kld": 0.08})  # better ppl, worse KLD
    chosen, reason = decide([int8, gptq, rtn], base, Constraints(max_ppl_increase=0.10, max_kld=0.06,
                                                                  max_decode_ms=25))
    assert chosen.candidate == "gptq-int4" and "KLD 0.0500 (bound 0.0600)" in reason
    assert not Constraints(max_kld=0.06).check(rtn, base)["accuracy"][0]
    chosen, reason = decide([gptq, rtn], base, Constraints(max_ppl_increase=0.5, max_kld=0.01))
    assert chosen is None and reason.index("gptq-int4") < reason.index("rtn-int4")  # closest by KLD first
    keys = (Constraints(max_kld=0.1).quality_key, "decode_ms_per_token", "peak_rss_mb")
    assert [r.candidate for r in pareto([base, int8, gptq, rtn], keys)] == ["dense", "int8", "gptq-int4"]


def test_a_size_budget_decides_and_puts_an_allocated_gguf_first_for_llamacpp():
    """--max-size: a file over it misses (the whole file, from the measured disk size); with
    --target llamacpp an allocated GGUF of that size is the first candidate, and its recipe is the
    gguf_allocate step with that target."""
    from slimkit.advisor.llamacpp import ALLOCATED, allocated_recipe, candidates

    small, big = _row("small", 1, 2, 10.5, 20, 300), _row("big", 0, 2, 10.1, 20, 600)  # disk 150 / 300 MiB
    constraints = Constraints(max_ppl_increase=0.10, max_size="200MB")
    assert constraints.max_size == 200_000_000
    chosen, reason = decide([big, small], BASE, constraints)
    assert chosen.candidate == "small" and "size: file 314.6 MB (budget 200.0)" in reason
    assert [c.name for c in candidates(90_000_000)][0] == ALLOCATED and candidates(None)[0].name != ALLOCATED
    step = allocated_recipe(90_000_000).steps[0]
    assert step.method == "gguf_allocate" and step.target_size == 90_000_000


def test_llamacpp_measurements_become_advisor_rows():
    from slimkit.advisor.framework import LLAMACPP_CANDIDATES
    from slimkit.advisor.llamacpp import advise_row
    from slimkit.results import LlamaCppRow

    row = LlamaCppRow(model="m", made_by="Q4_K_M", gguf="m.gguf", file_mb=100.0, bits_per_weight=6.2, ppl=16.1,
                      mean_kld=0.026, p99_kld=0.24, top1_agreement=0.92, prefill_tok_s=640.0, decode_tok_s=40.0,
                      decode_tok_s_std=1.0, threads=2, chunks=16)
    r = advise_row(row, 128, 3, LLAMACPP_CANDIDATES[3])
    assert (r.candidate, r.rule, r.decode_ms_per_token, r.prefill_ms, r.peak_rss_mb) == ("gguf-q4_k_m", 2, 25.0, 200.0,
                                                                                         100.0)
    assert r.mean_kld == 0.026 and r.pack == "gguf" and r.kernels_batch_1 == ["llama.cpp Q4_K_M"]


def test_skip_reasons_follow_the_device_and_the_budgets():
    by = {c.name: c for c in CANDIDATES}
    assert "sparse tensor cores" in by["sparsegpt-2of4-int4"].skip_reason(CPU, None, False)
    assert by["sparsegpt-2of4-int4"].skip_reason(GPU, None, False) is None
    assert "no latency budget was given" in by["minitron-distill"].skip_reason(CPU, None, False)
    assert "was missed by the quantized" in by["minitron-distill"].skip_reason(CPU, False, False)
    assert by["minitron-distill"].skip_reason(CPU, True, False) is None
    assert "research" in by["sparsegpt-50"].skip_reason(CPU, None, False)
    assert by["int8"].skip_reason(CPU, None, False) is None


@pytest.mark.slow  # 74 s; `make demo` runs advise end to end
def test_advise_measures_candidates_and_writes_a_usable_recipe(tiny_llama_dir, tmp_path):
    from slimkit.advisor import AdviseSettings, advise
    from slimkit.recipes import load_recipe_file

    settings = AdviseSettings(TINY, decode_tokens=4)
    out = tmp_path / "advise"
    result = advise(str(tiny_llama_dir), Constraints(max_ppl_increase=0.5), CPU, out, settings)
    measured = [r.candidate for r in result.candidates]
    assert measured == ["int8", "w8a8", "gptq-int4", "awq-int4", "rtn-int4"]
    assert all(r.ppl > 0 and r.decode_ms_per_token > 0 for r in result.candidates)
    assert {s.candidate for s in result.skipped} == {"sparsegpt-2of4-int4", "minitron-distill", "sparsegpt-50"}
    assert result.recommended is not None and result.reason.startswith("Rule")
    recipe = load_recipe_file(out / "recommended.yaml")
    assert recipe.name == result.recommended_recipe
    for f in ("advise.md", "advise.json", "frontier.png"):
        assert (out / f).stat().st_size > 0
    # speed-ups against the fastest dense configuration timed here (fp32, or bf16 where it could win)
    against = result.baseline.baseline["decode"]
    assert against.startswith(str(tiny_llama_dir)) and "Speed-ups (x) are against" in (out / "advise.md").read_text()
    assert result.baseline.decode_speedup <= 1.0 + 1e-9


def test_reproduce_verdicts():
    assert ratio_verdict(2.96, 2.5) == "confirmed"
    assert ratio_verdict(2.0, 1.0).startswith("refuted (0.50x")
    assert range_verdict(0.93, 1.12, 0.95, 1.05) == "confirmed"
    assert range_verdict(0.93, 1.12, 0.5, 1.05).startswith("refuted")


def _report_dir(tmp: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = tmp / "run"
    d.mkdir()
    (d / "report.md").write_text("# a run\n\n| recipe | ppl |\n|---|---|\n| dense | 16.85 |\n| int4 | 18.79 |\n\n"
                                 "![the plot](plot.png)\n")
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(["dense", "int4"], [16.85, 18.79], color="#d62728")  # a saturated red, easy to find in a screenshot
    fig.savefig(d / "plot.png")
    plt.close(fig)
    return d


def test_html_report_is_self_contained(tmp_path):
    from slimkit.reports.html import render_html

    page = render_html([_report_dir(tmp_path)])
    assert "<table>" in page and page.count("data:image/png;base64,") == 1  # linked once, inlined once
    assert "http://" not in page and "https://" not in page  # nothing to fetch: opens offline


def test_html_report_renders_in_headless_chromium(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (make test installs Debian's chromium when it can)")
    from PIL import Image

    from slimkit.reports.html import render_html

    page = tmp_path / "report.html"
    page.write_text(render_html([_report_dir(tmp_path)]))
    artefacts = Path(os.environ.get("SLIMKIT_TEST_ARTIFACTS", "runs/test-artifacts"))
    artefacts.mkdir(parents=True, exist_ok=True)
    shot = artefacts / "html-report.png"
    shot.unlink(missing_ok=True)
    proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--screenshot={shot.resolve()}", "--window-size=1200,1400", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.exists(), proc.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    red = sum(1 for r, g, b in image.getdata() if r > 180 and g < 80 and b < 80)
    assert red > 2000, "the embedded plot is not visible in the screenshot"


@pytest.mark.slow
def test_a_missed_latency_budget_brings_in_prune_and_distil(tiny_llama_dir, tmp_path):
    from slimkit.advisor import AdviseSettings, advise

    settings = AdviseSettings(TINY, decode_tokens=4)
    result = advise(str(tiny_llama_dir), Constraints(max_ppl_increase=0.5, max_decode_ms=1e-3), CPU,
                    tmp_path / "advise", settings)
    names = [r.candidate for r in result.candidates]
    assert names[-1] == "minitron-distill" and "minitron-distill" not in {s.candidate for s in result.skipped}
    assert result.recommended is None and "No measured candidate" in result.reason


def test_reproduce_tables_3_to_5_from_measurements(monkeypatch, tmp_path):
    """model_rows turns one run's compress reports and benchmark rows into tables 3-5."""
    from slimkit.advisor import reproduce

    names = {"sparsegpt-50": 30.0, "sparsegpt-2of4": 56.0, "magnitude-50": 427.0, "magnitude-2of4": 1759.0,
             "rtn-int8": 16.9, "gptq-int4-g64": 18.8, "sparsegpt-2of4-gptq-int4": 70.0, "structured-heads-mlp": 58.0}
    def ppl(value):
        return Quality(metric="ppl", value=value, details={})

    reports = [CompressReport.model_construct(  # only the fields the tables read
        recipe={"name": n}, compressed=ppl(v), baseline=ppl(16.85),
        model=ModelSection.model_construct(parameters=106 if n == "structured-heads-mlp" else 134))
        for n, v in names.items()]

    def row(decode, ram, ppl=None):
        return BenchRow.model_construct(decode_speedup=decode, weights_ram_mb=ram, ppl=ppl)

    by = {"dense": row(1.0, 513), "int8": row(2.2, 240), "w8a8": row(2.7, 240, 63.0), "int4": row(2.0, 165),
          "2:4": row(0.4, 323), "2:4+int4": row(0.8, 120), "structured (no recovery)": row(1.2, 403)}
    monkeypatch.setattr(reproduce, "_measure_variants", lambda *a: (reports, by))
    monkeypatch.setattr(reproduce, "_theory_memory", lambda m: {"int8": 2.1, "w8a8": 2.1, "int4": 3.2, "2:4": 1.6,
                                                                "2:4+int4": 4.0})
    rows, bench = reproduce.model_rows("m", tmp_path, TINY, None, print)
    tables = {r.table.split(".")[0] for r in rows}
    assert tables == {"3", "4", "5"} and len(rows) == 7 + 12 + 3 and len(bench) == len(by)
    verdict = {r.claim_what: r.verdict for r in rows}
    assert verdict["ordering: sparsegpt-50 < magnitude-50"] == "confirmed"
    assert verdict["structured pruning: speed-up from the architecture, no special hardware"] == "confirmed"
    assert verdict["2:4 + int4: decode speed-up on this device"].startswith("confirmed")


def test_every_pipeline_row_is_measured_against_the_dense_model(monkeypatch, tmp_path):
    """reproduce (like the advisor and `compress --bench`) gets its KLD reference from the pipeline:
    the dense model, measured first, never the first compressed variant."""
    from slimkit import pipeline
    from slimkit.advisor.reproduce import _measure_variants
    from slimkit.benchmarks import model as bench_model

    measured = []

    def fake_measure(model, bench, note=None):
        measured.append((str(model), bench.reference))
        return _row(str(model), 0, 0, 10.0, 50.0)

    monkeypatch.setattr(pipeline, "compress_stage", lambda model, recipes, *a, **k: (None, []))
    monkeypatch.setattr(pipeline, "pack_stage", lambda layout, variants, where, *a, **k:
                        {v.label: tmp_path / v.label.replace(":", "of") for v in variants})
    monkeypatch.setattr(bench_model, "measure_isolated", fake_measure)
    _, rows = _measure_variants("smollm2-135m", tmp_path / "out", QUICK, pipeline.NoProgress(), lambda m: None)
    assert measured[0] == ("smollm2-135m", "smollm2-135m")  # the dense model first, as its own reference
    assert len(measured) == 1 + 6 and {ref for _, ref in measured} == {"smollm2-135m"}
    assert list(rows)[0] == "dense" and rows["dense"].model == "smollm2-135m"
