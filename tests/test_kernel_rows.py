"""Kernel or dequantize + GEMM by rows (formats/kernel_rows.py): the dequantized path checked
against the textbook x @ W.T, the int4 layout unpacking against the probed permutation, and the
measured choice applied per shape and cached per machine."""

import json

import pytest
import torch

import slimkit.formats.integer as integer
from slimkit.formats import base, kernel_rows
from slimkit.formats.integer import Int4Grouped, Int8WeightOnly


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(kernel_rows, "gemm_dtypes_to_try", lambda: ("float32",))  # not this CPU's probe
    return tmp_path / kernel_rows.CACHE_FILE


def test_where_bf16_could_win_the_dequantize_path_times_both_dtypes_and_keeps_the_faster(cache, monkeypatch):
    """On a CPU whose probe says bf16 GEMM could win, each shape's crossover times the dequantize + GEMM
    path in fp32 and in bf16 and the layer computes in the faster; entries timed in fp32 only are
    measured again; the bf16 path is x @ W.T within bf16's rounding."""
    monkeypatch.setattr(kernel_rows, "gemm_dtypes_to_try", lambda: ("float32", "bfloat16"))
    monkeypatch.setattr(kernel_rows, "ROWS", (16, 64))
    int4, _ = _layers()
    key = kernel_rows.shape_key(int4)
    cache.write_text(json.dumps({kernel_rows.machine_key(): {key: {"kernel_max_rows": 5}}}))
    kernel_rows.choose_kernel_rows([int4])
    entry = json.loads(cache.read_text())[kernel_rows.machine_key()][key]
    assert entry["gemm_dtypes"] == ["float32", "bfloat16"] and all(len(ms) == 3 for ms in entry["ms"].values())
    fastest = min(("float32", "bfloat16"), key=lambda d: entry["ms"][max(entry["ms"], key=int)][1 + (d == "bfloat16")])
    assert entry["gemm_dtype"] == fastest and int4.gemm_dtype == getattr(torch, fastest)
    x = torch.randn(300, 128)
    reference = x @ int4.dequantize().T
    int4.gemm_dtype = torch.bfloat16
    assert int4.path_for(10**6) == "dequantize (tiles) + bf16 matmul"
    assert (int4.dequantized_matmul(x) - reference).abs().max() <= 0.01 * reference.abs().max()


def _layers(out=192, cols=128, group=32):
    torch.manual_seed(0)
    w = torch.randn(out, cols)
    return Int4Grouped.from_dense(w, group_size=group), Int8WeightOnly.from_dense(w)


def test_int4_kernel_layout_unpacks_as_the_probed_permutation(monkeypatch):
    monkeypatch.setenv(integer.INT_KERNELS_ENV, "torch")  # torch's kernel layout, not slimkit's
    layer, _ = _layers()
    assert layer._kernel is not None
    fast = layer.nibbles()
    monkeypatch.setattr(integer, "_tile_layout_is_k_major", lambda cols: False)
    assert torch.equal(fast, layer.nibbles())  # the probe path: every nibble found by its index
    assert torch.equal(layer.nibbles(64, 192), fast[64:192])
    with pytest.raises(ValueError, match="64-row tiles"):
        layer.nibbles(10, 64)


@pytest.mark.parametrize("tile_elements", [1 << 21, 64 * 128])  # one tile, or three tiles of 64 rows
def test_dequantized_matmul_is_x_times_w_transposed(monkeypatch, tile_elements):
    monkeypatch.setattr(base, "DEQUANTIZE_TILE_ELEMENTS", tile_elements)
    x = torch.randn(300, 128)
    for layer in _layers():
        w = layer.dequantize()
        assert torch.equal(layer.dequantize_rows(64, 128), w[64:128])
        torch.testing.assert_close(layer.dequantized_matmul(x), x @ w.T, rtol=1e-5, atol=1e-5)


def test_rows_above_the_measured_limit_run_dequantized_fp32(cache):
    calls = []

    def measure(layer):
        calls.append(kernel_rows.shape_key(layer))
        return {"kernel_max_rows": 16, "ms": {}}

    int4, int8 = _layers()
    twin, _ = _layers()
    keys = [kernel_rows.shape_key(int4), kernel_rows.shape_key(int8)]
    assert kernel_rows.choose_kernel_rows([int4, int8, twin], measure) == dict.fromkeys(keys, 16)
    assert calls == keys  # one measurement per shape
    for layer in (int4, int8):
        x = torch.randn(17, 128)
        reference = x @ layer.dequantize().T
        assert torch.equal(layer.matmul(x), layer.dequantized_matmul(x))  # 17 rows > 16: fp32 path
        assert layer.path_for(17).startswith("dequantize") and "kernel" in layer.path_for(16)
        kernel = layer.matmul(x[:16])  # bf16 or int8 activations: close, not equal
        assert (kernel - reference[:16]).norm() < 0.01 * reference[:16].norm()
    # the next process reads the machine's cache instead of measuring again
    fresh, _ = _layers()
    kernel_rows.choose_kernel_rows([fresh], measure)
    assert len(calls) == 2 and fresh.kernel_rows() == 16
    saved = json.loads(cache.read_text())
    assert saved[kernel_rows.machine_key()][kernel_rows.shape_key(int8)]["kernel_max_rows"] == 16


def test_a_damaged_cache_is_measured_again(cache):
    cache.write_text("{not json")
    layer, _ = _layers()
    kernel_rows.choose_kernel_rows([layer], lambda m: {"kernel_max_rows": 64, "ms": {}})
    assert layer.kernel_rows() == 64 and json.loads(cache.read_text())


def test_crossover_stops_at_the_first_row_count_where_dequantizing_wins(monkeypatch):
    layer, _ = _layers()
    # fake clocks: the kernel costs 1 per row, dequantize + GEMM 40 + 0.5 per row: crossing at 80 rows
    monkeypatch.setattr(layer, "kernel_matmul", lambda x: ("kernel", x.shape[0]))
    monkeypatch.setattr(layer, "dequantized_matmul", lambda x, dtype=None: ("dense", x.shape[0]))

    def fake_time(fn, repeats):
        path, rows = fn()
        return (rows if path == "kernel" else 40 + 0.5 * rows) * 1e-6

    monkeypatch.setattr(kernel_rows, "time_call", fake_time)
    result = kernel_rows.measure_crossover(layer, rows=(16, 64, 128, 256))
    assert result["kernel_max_rows"] == 64 and list(result["ms"]) == [16, 64, 128]
    assert kernel_rows.measure_crossover(layer, rows=(512, 1024))["kernel_max_rows"] == 8  # decode stays
    monkeypatch.setattr(kernel_rows, "time_call", lambda fn, repeats: 1e-6 if fn()[0] == "kernel" else 2e-6)
    assert kernel_rows.measure_crossover(layer, rows=(1, 16))["kernel_max_rows"] == base.KERNEL_MAX_ROWS


def test_one_disturbed_timing_does_not_decide(monkeypatch):
    layer, _ = _layers()
    monkeypatch.setattr(layer, "kernel_matmul", lambda x: "kernel")
    monkeypatch.setattr(layer, "dequantized_matmul", lambda x, dtype=None: "dense")
    clock = iter([9e-3, 1e-3] + [1e-3, 2e-3] * 10)  # the kernel's first timing was disturbed
    monkeypatch.setattr(kernel_rows, "time_call", lambda fn, repeats: next(clock))
    assert kernel_rows.measure_crossover(layer, rows=(16, 64))["kernel_max_rows"] == base.KERNEL_MAX_ROWS


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_greedy_tokens_are_the_same_on_either_path_on_five_prompts(tiny_llama_dir, tmp_path, fmt):
    """The kernel (bf16 activations) and dequantize + fp32 GEMM give one packed model the same greedy
    continuation of 5 prompts, prefill and decode alike: the row choice changes speed, not tokens."""
    from slimkit.compression.pack_dir import pack_to_dir
    from slimkit.formats import packed_layers
    from slimkit.generation import StaticDecoder
    from slimkit.models import load_model

    pack_to_dir(str(tiny_llama_dir), tmp_path / fmt, fmt=fmt, group_size=32)
    loaded = load_model(str(tmp_path / fmt))
    prompts = ["The history of the city", "In 1969 the first", "Water boils at", "Once upon a time, a",
               "The most important rule of"]
    layers = [m for m in packed_layers(loaded.model).values() if m.has_row_choice()]
    assert layers
    tokens = {}
    for path, rows in (("kernel", 10**6), ("dequantize", 0)):
        for layer in layers:
            layer.kernel_max_rows = rows
        assert all(m.path_for(1).startswith(path) or path in m.path_for(1) for m in layers)
        decoder = StaticDecoder(loaded.model, 40, compiled=False)
        tokens[path] = [decoder.generate(loaded.tokenizer(p, return_tensors="pt").input_ids, 10).tokens
                        for p in prompts]
    assert tokens["kernel"] == tokens["dequantize"]
