"""Packed formats: reload exactly, compute what they store, and weigh what their arithmetic says."""

import pytest
import torch

from conftest import tiny_llama
from slimkit.errors import ShapeError, SlimkitError
from slimkit.formats import format_class, load_packed, pack_model, packed_layers, save_packed
from slimkit.formats.floating import nf4_levels
from slimkit.formats.pack import PACKED_FILE
from slimkit.formats.sparse import SparseUnstructured
from slimkit.models import adapter_for
from slimkit.numerics.magnitude import nm_mask, unstructured_mask
from slimkit.numerics.rtn import QuantSpec, rtn_quantize

# (format, bytes per weight by the format's arithmetic for a 64 x 256 weight, tolerance of the
# dequantized weight relative to max |w|)
CASES = {
    "int8": (1 + 4 / 256, 0.005),
    "w8a8": (1 + 4 / 256, 0.005),
    "int4": (0.5 + 2 / 64, 0.08),
    "nf4": (0.5 + 1 / 64 + 8 / (64 * 256), 0.1),  # codes + int8 block absmax + one dq scale and the offset
    "fp8": (1 + 4 / 256, 0.07),
}


def _weight(rows=64, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)


def _reload(mod):
    return format_class(mod.format).from_stored({k: v.clone() for k, v in mod.stored().items()},
                                                {**mod.meta, "shape": [mod.out_features, mod.in_features]},
                                                mod.bias)


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_dense_formats_reload_exactly_and_approximate_the_weight(fmt):
    w = _weight()
    bias = torch.randn(64)
    mod = format_class(fmt).from_dense(w, bias)
    again = _reload(mod)
    assert all(torch.equal(a, b) for a, b in zip(mod.stored().values(), again.stored().values()))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 256, generator=g), torch.randn(9, 256, generator=g)  # small-batch kernel, large-batch path
    # kernels with bf16 activations differ from fp32 math by bf16 rounding (~0.4%); W8A8 rounds
    # activations to 7 bits per row (fbgemm's reduce_range), up to ~3% of the largest output
    act_tol = 0.05 if fmt == "w8a8" else 0.02
    for xi in x:
        assert torch.equal(mod(xi), again(xi))  # same bytes, same kernel: identical outputs
        ref = xi @ mod.dequantize().T + bias
        assert (mod(xi) - ref).abs().max() <= act_tol * ref.abs().max()
    per_weight, tol = CASES[fmt]
    assert (mod.dequantize() - w).abs().max() <= tol * w.abs().max()
    disk = mod.disk_bytes() - 64 * 4  # minus the fp32 bias
    assert disk / w.numel() == pytest.approx(per_weight, rel=0.01), disk / w.numel()


def test_int4_g64_bf16_scales_is_0_53_bytes_per_weight_and_uses_the_kernel():
    w = _weight(576, 1536)
    mod = format_class("int4").from_dense(w, group_size=64)
    assert mod.disk_bytes() / w.numel() == pytest.approx(0.53125)
    assert "kernel" in mod.path_for(1) and mod.packed is None  # RAM holds the kernel layout only
    # slimkit's kernel: a float16 scale and an int8 zero per group; torch's: bf16 scale and zero
    assert mod.ram_bytes() / w.numel() == pytest.approx(0.5 + (3 if mod._q4 is not None else 4) / 64)


def test_int4_from_gptq_codes_is_lossless_against_the_fake_quantized_weight():
    w = _weight()
    spec = QuantSpec(4, True, 64, torch.bfloat16)
    w_hat, params = rtn_quantize(w, spec)
    mod = format_class("int4").from_quant(params.q, params.scale, params.zero)
    assert torch.equal(mod.dequantize(), w_hat)
    asym = QuantSpec(4, False, 32, torch.float16)
    w_hat, params = rtn_quantize(w, asym)
    mod = format_class("int4").from_quant(params.q, params.scale, params.zero)
    assert torch.equal(mod.dequantize(), w_hat)
    assert torch.equal(_reload(mod).dequantize(), w_hat)


def test_nf4_levels_are_sixteen_with_an_exact_zero():
    levels = nf4_levels()
    assert levels.numel() == 16 and (levels == 0).sum() == 1 and levels.max() == 1 and levels.min() == -1


@pytest.mark.parametrize("sparsity", [0.5, 0.99])
def test_sparse_picks_the_smaller_layout_and_reloads_exactly(sparsity):
    w = _weight()
    mask = unstructured_mask(w, sparsity)
    mod = SparseUnstructured.from_dense(w, mask=mask)
    assert mod.layout == ("bitmask" if sparsity == 0.5 else "csr")  # crossover near 97% sparsity
    again = _reload(mod)
    assert torch.equal(again.dequantize(), w * mask)
    x = torch.randn(3, 256)
    assert torch.allclose(mod(x), x @ (w * mask).T, atol=1e-4)
    nnz = int(mask.sum())
    expected = min(64 * 256 / 8 + nnz * 4, nnz * 8 + 65 * 4)
    assert mod.disk_bytes() == expected


@pytest.mark.parametrize("values", ["fp32", "int8", "int4"])
def test_24_stores_half_the_values_plus_one_bit_per_weight(values):
    w = _weight()
    mask = nm_mask(w, 2, 4)
    quant = None
    target = w * mask
    if values != "fp32":
        spec = QuantSpec(8, True, None, torch.float32) if values == "int8" else QuantSpec(4, True, 64, torch.bfloat16)
        target, quant = rtn_quantize(w * mask, spec)
    mod = format_class("2:4").from_dense(w, mask=mask, quant=quant)
    assert torch.equal(mod.dequantize(), target * mask)
    assert torch.equal(_reload(mod).dequantize(), target * mask)
    value_bytes = {"fp32": 4, "int8": 1, "int4": 0.5}[values]
    scale_bytes = {"fp32": 0, "int8": 64 * 4, "int4": 64 * 4 * 2}[values]
    assert mod.disk_bytes() == 64 * 256 * (value_bytes / 2 + 1 / 8) + scale_bytes


def test_24_refuses_a_mask_that_is_not_2_of_4():
    w = _weight()
    with pytest.raises(ShapeError, match="2 of every 4"):
        format_class("2:4").from_dense(w, mask=unstructured_mask(w, 0.5))


@pytest.mark.parametrize("fmt", ["int8", "w8a8", "int4", "nf4", "fp8", "sparse", "2:4"])
def test_packed_model_directory_round_trip(tmp_path, fmt):
    model = tiny_llama()
    adapter = adapter_for(model)
    linears = adapter.linears(model)
    pack_model(model, linears, fmt=fmt, group_size=32)
    assert set(packed_layers(model)) == set(linears)
    ids = torch.randint(0, 96, (2, 12))
    before = model(ids).logits
    save_packed(model, None, tmp_path)
    again = load_packed(tmp_path)
    assert torch.equal(again(ids).logits, before)


def test_corrupt_or_truncated_packed_file_is_a_clear_error(tmp_path):
    model = tiny_llama()
    pack_model(model, adapter_for(model).linears(model), fmt="int4", group_size=32)
    save_packed(model, None, tmp_path)
    path = tmp_path / PACKED_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlimkitError, match="corrupt or truncated"):
        load_packed(tmp_path)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(SlimkitError, match="corrupt or truncated"):
        load_packed(tmp_path)


def test_an_embedding_tied_to_an_int8_head_reads_its_rows_and_the_file_holds_them_once(tmp_path):
    from safetensors import safe_open

    from slimkit.formats.embedding import RowsOfHead

    model = tiny_llama()
    pack_model(model, adapter_for(model).linears(model, include_lm_head=True), fmt="int8")
    head = model.lm_head
    save_packed(model, None, tmp_path)
    again = load_packed(tmp_path)
    ids = torch.randint(0, 96, (1, 9))
    assert again.config.tie_word_embeddings and isinstance(again.get_input_embeddings(), RowsOfHead)
    assert torch.equal(again.get_input_embeddings()(ids)[0], head.dequantize()[ids[0]])  # the head's int8 rows
    assert torch.equal(again(ids).logits, model(ids).logits)  # the saved model shares them the same way
    with safe_open(str(tmp_path / PACKED_FILE), framework="pt") as f:
        assert "lm_head.q" in f.keys() and not any(k.startswith("model.embed_tokens") for k in f.keys())


def test_a_tied_head_in_another_format_is_packed_apart_and_the_embedding_stays(tmp_path):
    model = tiny_llama()
    adapter = adapter_for(model)
    embedding = model.get_input_embeddings().weight.detach().clone()
    pack_model(model, adapter.linears(model, include_lm_head=True), fmt="int4", group_size=32)
    ids = torch.randint(0, 96, (1, 9))
    before = model(ids).logits
    save_packed(model, None, tmp_path)
    again = load_packed(tmp_path)
    assert packed_layers(again)["lm_head"].format == "int4" and not again.config.tie_word_embeddings
    assert torch.equal(again.get_input_embeddings().weight, embedding)
    assert torch.equal(again(ids).logits, before)


def test_truncated_or_pickled_hf_weights_are_a_clear_error(tiny_llama_dir, tmp_path):
    import shutil

    from slimkit.models import load_model

    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama_dir, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(SlimkitError, match="corrupt or truncated"):
        load_model(bad)
    weights.unlink()
    torch.save({"x": torch.zeros(1)}, bad / "pytorch_model.bin")  # a pickle: never loaded
    with pytest.raises(SlimkitError, match="never unpickles"):
        load_model(bad)


@pytest.mark.parametrize("bits", [2, 3])
def test_pack_bits_round_trips_every_value(bits):
    from slimkit.formats.base import pack_bits, unpack_bits

    v = torch.randint(0, 1 << bits, (5, 64), dtype=torch.uint8)
    packed = pack_bits(v, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 64 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits), v)
    first = pack_bits(torch.arange(8, dtype=torch.uint8).remainder(1 << bits)[None], bits)  # value i at bits*i
    assert int(sum(int(b) << (8 * j) for j, b in enumerate(first[0]))) == sum(
        (i % (1 << bits)) << (bits * i) for i in range(8))


@pytest.mark.parametrize("bits,symmetric", [(2, True), (3, True), (3, False)])
def test_int2_and_int3_codes_are_written_at_their_width_and_reload_exactly(bits, symmetric):
    w = _weight(64, 256)
    w_hat, params = rtn_quantize(w, QuantSpec(bits, symmetric, 64, torch.bfloat16))
    mod = format_class("int4").from_quant(params.q, params.scale, params.zero, bits=bits)
    codes = mod.stored()["codes"]
    assert codes.numel() == w.numel() * bits // 8 and "packed" not in mod.stored()
    again = _reload(mod)
    assert torch.equal(again.dequantize(), w_hat) and torch.equal(again.nibbles(), mod.nibbles())
    p4 = rtn_quantize(w, QuantSpec(4, symmetric, 64, torch.bfloat16))[1]
    four = format_class("int4").from_quant(p4.q, p4.scale, p4.zero)
    assert mod.disk_bytes() - codes.numel() == four.disk_bytes() - w.numel() // 2  # same scales, narrower codes


def test_an_int3_file_written_before_true_widths_still_loads(tmp_path):
    """Packed dirs from before `stored_bits` hold 3-bit codes in nibbles; they load as they are."""
    model = tiny_llama()
    pack_model(model, adapter_for(model).linears(model), fmt="int4", group_size=32)
    for mod in packed_layers(model).values():
        mod.meta = {"bits": 3, "symmetric": mod.zero is None}  # the old header: no stored_bits
    save_packed(model, None, tmp_path)
    again = load_packed(tmp_path)
    ids = torch.randint(0, 96, (1, 9))
    assert torch.equal(again(ids).logits, model(ids).logits)
