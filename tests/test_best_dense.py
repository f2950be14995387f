"""`bench model`'s ratios against the fastest dense configuration on the machine (fp32 or bf16,
eager or compiled), and the per-CPU probe that decides whether bf16 is worth timing."""

from __future__ import annotations

import pytest

from slimkit.benchmarks import model as bench
from slimkit.errors import SlimkitError
from slimkit.formats import gemm_dtype as dense_dtype
from slimkit.protocol import BenchSettings
from slimkit.results import BenchRow

BASE = dict(prompt_tokens=128, long_prompt_tokens=512, batch=2, peak_rss_mb=100.0, weights_ram_mb=10.0,
            disk_mb=10.0, ppl=None, eval_tokens=0, kernels_batch_1=[], threads=2)


def _row(model, decode, prefill, compiled=None, formats=(), **extra):
    return BenchRow(model=model, decode_ms_per_token=decode, prefill_ms=prefill, long_prefill_ms=prefill * 4,
                    throughput_tok_s=1000 / decode, compiled_decode_ms_per_token=compiled,
                    compile_s=10.0 if compiled else None, formats=list(formats), **BASE, **extra)


def test_every_ratio_is_against_the_fastest_dense_row_of_that_measurement():
    """bf16 compiled decodes fastest of the dense rows, fp32 prefills fastest: each ratio takes its own."""
    rows = bench.compare([
        _row("dense", decode=20.0, prefill=60.0, compiled=12.0),
        _row("dense (bf16)", decode=15.0, prefill=80.0, compiled=8.0, dtype="bfloat16"),
        _row("int4", decode=4.0, prefill=40.0, compiled=2.0, formats=["int4"])], best_dense=True)
    int4 = rows[2]
    assert (int4.decode_speedup, int4.compiled_decode_speedup) == (2.0, 4.0)  # against 8.0 ms (bf16 compiled)
    assert (int4.prefill_speedup, int4.long_prefill_speedup) == (1.5, 1.5)  # against fp32's 60 and 240 ms
    assert rows[0].decode_speedup == pytest.approx(0.4)  # fp32 eager is not the reference any more
    md = bench.table(rows)
    assert "decode: dense (bf16), compiled" in md and "prefill: dense;" in md


def test_another_dense_model_in_the_list_is_a_candidate_not_the_baseline():
    """A smaller dense model (pruned, distilled) beside the baseline gets ratios, it does not set them."""
    rows = bench.compare([_row("big", decode=20.0, prefill=60.0),
                          _row("small-dense", decode=10.0, prefill=30.0),
                          _row("big (bf16)", decode=16.0, prefill=90.0, dtype="bfloat16")], best_dense=True)
    assert (rows[1].decode_speedup, rows[1].prefill_speedup) == (1.6, 2.0)
    assert rows[0].baseline["decode"] == "big (bf16), eager" and rows[0].baseline["prefill"] == "big"


def test_without_best_dense_the_first_row_stays_the_baseline():
    rows = bench.compare([_row("dense", decode=20.0, prefill=60.0, compiled=12.0),
                          _row("int4", decode=4.0, prefill=40.0, compiled=2.0, formats=["int4"])])
    assert (rows[1].decode_speedup, rows[1].compiled_decode_speedup) == (5.0, 10.0)
    assert rows[0].baseline is None and "fastest dense" not in bench.table(rows)


@pytest.mark.parametrize("bf16_ms, timed", [([4.0, 30.0, 120.0], False), ([4.0, 1.5, 5.0], True)])
def test_the_baseline_is_timed_in_bf16_only_where_the_probe_says_it_could_win(monkeypatch, bf16_ms, timed):
    probe = {"shape": [1536, 576], "rows": [1, 128, 512], "float32": [0.15, 7.0, 24.0], "bfloat16": bf16_ms}
    calls = []

    def fake(model, settings, note):
        calls.append((model, settings.dtype, settings.windows))
        return _row(model + (" (bf16)" if settings.dtype == "bfloat16" else ""), decode=10.0, prefill=50.0,
                    formats=["int4"] if model == "int4" else [], dtype=settings.dtype)

    monkeypatch.setattr(bench, "measure_isolated", fake)
    monkeypatch.setattr(dense_dtype, "gemm_probe", lambda: probe)
    rows = bench.run(["dense", "int4"], BenchSettings(windows=4, rounds=1, best_dense=True))
    assert calls[:2] == [("dense", "float32", 4), ("int4", "float32", 4)]
    assert (calls[2:] == [("dense", "bfloat16", 0)]) is timed and len(rows) == 2 + timed
    md = bench.table(rows)
    assert "dense dtype on this CPU: a 1536x576 bf16 GEMM" in md
    assert ("so the baseline was also timed in bf16" in md) is timed
    assert ("no candidate for the fastest dense model here" in md) is not timed


def test_the_probe_is_measured_once_per_machine_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMKIT_CACHE", str(tmp_path))
    measured = []

    def measure():
        measured.append(1)
        return dense_dtype.measure_gemm_dtypes(shape=(64, 32), rows=(1, 8), repeats=1)

    first = dense_dtype.gemm_probe(measure)
    assert dense_dtype.gemm_probe(measure) == first and len(measured) == 1
    assert first["rows"] == [1, 8] and all(ms > 0 for ms in first["float32"] + first["bfloat16"])
    assert (tmp_path / dense_dtype.CACHE_FILE).is_file()


def test_a_dense_model_runs_in_bf16_and_a_packed_one_is_refused(tiny_llama_dir, tmp_path):
    from slimkit.compression.pack_dir import pack_to_dir

    settings = BenchSettings(dtype="bfloat16", windows=0, prompt=8, long_prompt=0, decode=2, batch=1)
    row = bench.measure(str(tiny_llama_dir), settings)
    assert row.model.endswith("(bf16)") and row.dtype == "bfloat16"
    assert row.kernels_batch_1 == ["dense bf16 (torch.nn.Linear)"] and row.decode_ms_per_token > 0
    pack_to_dir(str(tiny_llama_dir), tmp_path / "int4", fmt="int4")
    with pytest.raises(SlimkitError, match="applies to dense models"):
        bench.measure(str(tmp_path / "int4"), settings)


def test_bf16_candidacy_counts_only_the_row_counts_asked_for():
    """A bf16 GEMV as fast as fp32's makes bf16 a candidate for a dense decode, not for the packed layers'
    dequantize + GEMM path, which runs at prefill-sized row counts only."""
    probe = {"rows": [1, 128, 512], "float32": [1.0, 1.0, 1.0], "bfloat16": [0.9, 4.0, 5.0]}
    assert dense_dtype.bf16_is_a_candidate(probe) and not dense_dtype.bf16_is_a_candidate(probe, min_rows=16)
