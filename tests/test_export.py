"""Exports load in the other library (transformers, with its compressed-tensors and GGUF loaders)."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from slimkit.cli.main import app
from slimkit.compression.pack_dir import pack_to_dir
from slimkit.errors import SlimkitError
from slimkit.export.job import ExportSettings, export_model, load_exported
from slimkit.formats import format_class
from slimkit.models import load_model

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_int4(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "int4"
    pack_to_dir(str(tiny_llama_dir), out, fmt="int4", group_size=32, include_lm_head=False)
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("to", ["compressed-tensors", "gguf", "hf"])
def test_int4_export_loads_in_transformers_with_the_same_function(tiny_int4, tmp_path, to):
    ours = load_model(tiny_int4).model
    out = tmp_path / to
    result = export_model(str(tiny_int4), out, to, ExportSettings(verify=False))
    theirs = load_exported(out, to)
    assert not any("slimkit" in type(m).__module__ for m in theirs.modules())  # no slimkit code at load
    ids = torch.randint(0, 200, (1, 24), generator=torch.Generator().manual_seed(0))
    a, b = _logits(ours, ids), _logits(theirs, ids)
    # slimkit's int4 kernel takes bf16 activations; the others compute in fp32 on the same codes
    assert (a - b).abs().max() <= 0.02 * a.abs().max()
    assert json.loads((out / "export.json").read_text())["formats"] == ["int4"]
    if to == "gguf":
        assert result["tensors_by_type"].get("Q4_0 (codes kept)", 0) > 0


@pytest.mark.parametrize("full_range", [False, True])
def test_gguf_q4_0_blocks_are_the_int4_codes_bit_for_bit(full_range):
    import gguf

    from slimkit.export.gguf.types import int4_blocks
    from slimkit.numerics.rtn import QuantSpec, rtn_quantize

    w = torch.randn(32, 128)
    w_hat, p = rtn_quantize(w, QuantSpec(4, True, 64, torch.float16, full_range))  # full range: negative d
    data, qtype = int4_blocks(format_class("int4").from_quant(p.q, p.scale, p.zero))
    assert qtype == gguf.GGMLQuantizationType.Q4_0
    assert np.array_equal(gguf.quants.dequantize(data, qtype), w_hat.numpy())


def test_full_range_codes_pack_and_export_with_their_negative_scales(tiny_llama_dir, tmp_path):
    """A full-range int4 compress output (scales of both signs, code -8 used) -> packed -> compressed-tensors
    and GGUF loaded by transformers: all compute the fake-quantized model's function."""
    from slimkit.compression.memory import compress_to_dir
    from slimkit.protocol import EvalSettings
    from slimkit.recipes import parse_recipe

    recipe = parse_recipe({"name": "fr", "steps": [{"method": "rtn_quantize", "bits": 4, "group_size": 32,
                                                    "full_range": True}]})
    settings = EvalSettings(seqlen=32, max_windows=2, calibration_windows=2, calibration_seqlen=32)
    compress_to_dir(str(tiny_llama_dir), [recipe], tmp_path / "fr", settings)
    pack_to_dir(str(tmp_path / "fr"), tmp_path / "packed")
    packed = load_model(tmp_path / "packed").model
    int4 = [m for m in packed.modules() if getattr(m, "format", None) == "int4"]
    assert int4 and all((m.scale < 0).any() and (m.scale > 0).any() for m in int4)
    ids = torch.randint(0, 200, (1, 24), generator=torch.Generator().manual_seed(0))
    fake = _logits(load_model(tmp_path / "fr").model, ids)
    outputs = {"packed": _logits(packed, ids)}
    for to in ("compressed-tensors", "gguf"):
        export_model(str(tmp_path / "packed"), tmp_path / to, to, ExportSettings(verify=False))
        outputs[to] = _logits(load_exported(tmp_path / to, to), ids)
    for name, other in outputs.items():  # the packed kernel takes bf16 activations
        assert (fake - other).abs().max() <= 0.02 * fake.abs().max(), name


def test_24_is_refused_by_compressed_tensors_with_the_reason(tiny_llama_dir, tmp_path, monkeypatch):
    import slimkit.export.job as job

    packed = tmp_path / "p24"
    pack_to_dir(str(tiny_llama_dir), packed, fmt="2:4")

    def no_ppl(*args, **kwargs):
        raise AssertionError("the reference ppl ran before the refusal")

    monkeypatch.setattr(job, "_ppl", no_ppl)
    with pytest.raises(SlimkitError, match="removed their sparse formats in 2026.*--to hf"):
        export_model(str(packed), tmp_path / "ct", "compressed-tensors", ExportSettings(verify=True))
    assert not (tmp_path / "ct").exists()
    export_model(str(packed), tmp_path / "dense", "hf", ExportSettings(verify=False))  # what the error suggests works
    theirs = load_exported(tmp_path / "dense", "hf")
    w = theirs.model.layers[0].mlp.up_proj.weight
    assert ((w.view(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()


def test_cli_pack_and_export_and_bench(tiny_llama_dir, tmp_path):
    result = runner.invoke(app, ["pack", str(tiny_llama_dir), "--format", "int8", "-o", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert "packed" in result.output and (tmp_path / "p" / "pack.json").is_file()
    result = runner.invoke(app, ["export", str(tmp_path / "p"), "--to", "compressed-tensors", "-o",
                                 str(tmp_path / "ct"), "--windows", "2"])
    assert result.exit_code == 0, result.output
    assert "check: loaded by transformers" in result.output
    check = json.loads((tmp_path / "ct" / "export.json").read_text())["verify"]
    assert abs(check["relative_diff"]) < 0.02
    result = runner.invoke(app, ["export", str(tmp_path / "p"), "--to", "onnx", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "unknown export target" in result.output
    result = runner.invoke(app, ["pack", str(tiny_llama_dir), "-o", str(tmp_path / "q")])
    assert result.exit_code == 2 and "--format" in result.output  # auto needs a compress output


def test_bench_sparsity_writes_table_plot_and_json(tmp_path):
    result = runner.invoke(app, ["bench", "sparsity", "-o", str(tmp_path / "b"), "--blocks", "1", "--repeats", "3",
                                 "--sparsities", "0.5,0.95", "--batches", "1,8"])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "b" / "sparsity.json").read_text())["rows"]
    methods = {r["method"] for r in rows}
    assert {"dense", "zeros-in-dense", "torch CSR", "torch BSR 16x16", "slimkit sparse"} <= methods
    assert all(r["measured_speedup"] > 0 for r in rows) and len(rows) == 2 * 2 * 5 + 2  # + 2:4 at 50%
    png = (tmp_path / "b" / "sparsity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert "| 95% | 1 | 20.0x |" in (tmp_path / "b" / "sparsity.md").read_text()


@pytest.mark.slow  # 35 s: fresh processes per model
def test_bench_model_compares_in_fresh_processes(tiny_llama_dir, tiny_int4, tmp_path):
    result = runner.invoke(app, ["bench", "model", str(tiny_llama_dir), str(tiny_int4), "--decode", "4",
                                 "--prompt", "16", "--batch", "2", "--windows", "1", "-o", str(tmp_path / "bm"),
                                 "--no-compile", "--first-baseline"])  # compiled: test_generate.py; best dense: test_best_dense.py
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "bm" / "bench.json").read_text())
    assert [r["formats"] for r in rows] == [[], ["int4"]]
    assert rows[0]["decode_speedup"] == 1.0 and rows[1]["weights_ram_mb"] < rows[0]["weights_ram_mb"]
    assert all(r["peak_rss_mb"] > 0 and r["ppl"] > 1 for r in rows)
    assert "kernel" in rows[1]["kernels_batch_1"][0]
    packed = json.loads((tiny_int4 / "pack.json").read_text())  # the whole files, counted over the same parameters
    assert rows[1]["bits_per_weight"] == pytest.approx(packed["file_bits_per_weight"])
    assert rows[0]["bits_per_weight"] > rows[1]["bits_per_weight"]


@pytest.mark.real_model
@pytest.mark.parametrize("fmt", ["int4", pytest.param("int8", marks=pytest.mark.slow)])
def test_smollm2_exports_keep_perplexity_within_2_percent(smollm2_first_load, tmp_path, fmt):
    packed = tmp_path / fmt
    summary = pack_to_dir("smollm2-135m", packed, fmt=fmt)
    per_weight = {"int4": 0.5 + 2 / 64, "int8": 1 + 4 / 576}[fmt]
    blocks = [v for n, v in summary["layers"].items() if n != "lm_head"]
    assert all(v["bytes_per_weight"] == pytest.approx(per_weight, rel=0.01) for v in blocks)
    for to in ("compressed-tensors", "gguf"):
        check = export_model(str(packed), tmp_path / to, to, ExportSettings(windows=2))["verify"]
        assert abs(check["relative_diff"]) < 0.02, (to, check)
        assert check.get("tokenizer_matches", True)


def _fields(path) -> dict:
    """Every metadata field of a GGUF file, arrays included, as Python values."""
    import gguf

    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


@pytest.mark.slow  # 25-33 s: a whole SmolLM2 GGUF export
def test_gguf_export_of_smollm2_keeps_the_source_tokenizer_and_description(smollm2_first_load, tmp_path,
                                                                           monkeypatch):
    """SmolLM2 comes from a GGUF: a compress -> pack -> export chain copies its tokenizer (the
    pre-tokenizer llama.cpp splits text with included) and its general.* description, also when
    the pack was made with a relative path from another directory."""
    from transformers import AutoTokenizer

    from slimkit.compression.memory import compress_to_dir
    from slimkit.models.zoo import zoo_entry
    from slimkit.protocol import EvalSettings
    from slimkit.recipes import get_recipe

    compress_to_dir("smollm2-135m", [get_recipe("rtn-int4-g64")], tmp_path / "c", EvalSettings(max_windows=1))
    monkeypatch.chdir(tmp_path)
    pack_to_dir("c", "p")  # as a user types it
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    export_model(str(tmp_path / "p"), tmp_path / "g", "gguf", ExportSettings(verify=False))
    source, ours = _fields(zoo_entry("smollm2-135m").locate()), _fields(tmp_path / "g" / "model.gguf")
    tokenizer_keys = {k for k in source if k.startswith("tokenizer.")}
    assert tokenizer_keys and {k: ours.get(k) for k in tokenizer_keys} == {k: source[k] for k in tokenizer_keys}
    assert ours["tokenizer.ggml.pre"] == "smollm"
    for key in ("general.name", "general.organization", "general.license", "general.size_label"):
        assert ours[key] == source[key], key
    assert ours["general.quantization_version"] == 2
    # gguf + tokenizers (transformers' GGUF loader) rebuild the tokenizer: the same ids as the source's
    text = "The Eiffel Tower, completed in 1889, is 330 metres tall; it's Paris' most-visited monument."
    theirs = AutoTokenizer.from_pretrained(tmp_path / "g", gguf_file="model.gguf")
    assert theirs.encode(text, add_special_tokens=False) == smollm2_first_load.tokenizer.encode(
        text, add_special_tokens=False)


def test_gguf_export_from_an_hf_tokenizer_names_its_pre_tokenizer(tiny_int4, tmp_path):
    export_model(str(tiny_int4), tmp_path / "g", "gguf", ExportSettings(verify=False))
    assert _fields(tmp_path / "g" / "model.gguf")["tokenizer.ggml.pre"] == "smollm"  # SmolLM2's HF tokenizer


def test_an_unknown_pre_tokenizer_is_refused_not_guessed():
    from slimkit.export.gguf.tokenizer import pre_tokenizer

    class Splitter:
        def encode(self, text):
            return [len(word) for word in text.split()]

    with pytest.raises(SlimkitError, match="would not know this tokenizer's pre-tokenizer"):
        pre_tokenizer(Splitter())


def test_a_damaged_record_ends_the_lineage_instead_of_failing_the_export(tmp_path):
    from slimkit.export.job import ancestors

    (tmp_path / "p").mkdir()
    (tmp_path / "c").mkdir()
    (tmp_path / "p" / "pack.json").write_text(json.dumps({"source": str(tmp_path / "c")}))
    (tmp_path / "c" / "report.json").write_text("{ damaged")
    assert ancestors(str(tmp_path / "p")) == [str(tmp_path / "p"), str(tmp_path / "c")]
    (tmp_path / "p" / "pack.json").write_text("[1, 2]")  # JSON, but not a pack record
    assert ancestors(str(tmp_path / "p")) == [str(tmp_path / "p")]


def _tensor_types(path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def test_a_tied_embedding_is_typed_as_llama_quantize_types_the_head(tiny_int4, tmp_path):
    """The whole file: a tied embedding is the head (Q6_K, or Q8_0 where 256-wide blocks do not tile
    its rows), never F16 beside a quantized body. (Untied: tests/test_gguf_tokenizers.py.)"""
    result = export_model(str(tiny_int4), tmp_path / "tied", "gguf", ExportSettings(verify=False))
    types = _tensor_types(tmp_path / "tied" / "model.gguf")
    assert types["token_embd.weight"] == "Q8_0" and "output.weight" not in types  # 64-wide rows
    assert result["bits_per_weight"] == pytest.approx(result["bytes"] * 8 / result["parameters"])


def _decompressed(export_dir, name: str, bits: int, symmetric: bool, group: int) -> torch.Tensor:
    """One layer of a compressed-tensors export, decompressed by compressed-tensors itself."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors.torch import load_file

    tensors = {k[len(name) + 1:]: v for k, v in load_file(export_dir / "model.safetensors").items()
               if k.startswith(name + ".")}
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group))
    return PackedQuantizationCompressor.decompress(tensors, scheme)["weight"].float()


@pytest.mark.parametrize("bits,symmetric", [(3, False), (2, True)])
def test_int3_and_int2_codes_pack_at_their_width_and_export_to_compressed_tensors(tiny_llama_dir, tmp_path,
                                                                                   bits, symmetric):
    """Codes narrower than 4 bits: the packed file stores them at their width; compressed-tensors'
    own decompressor reads the export's codes, scales and (packed) zero points back to the packed
    weights; a symmetric export reloads in transformers to the same function (asymmetric group zero
    points, packed as compressed-tensors writes them, do not load in this transformers: it
    expects them unpacked, then unpacks them)."""
    from slimkit.compression.memory import compress_to_dir
    from slimkit.formats.pack import PACKED_FILE
    from slimkit.protocol import EvalSettings
    from slimkit.recipes import parse_recipe

    settings = EvalSettings(seqlen=32, max_windows=2, calibration_windows=2, calibration_seqlen=32)
    sizes = {}
    for b in (bits, 4):
        recipe = parse_recipe({"name": f"b{b}", "steps": [{"method": "rtn_quantize", "bits": b, "group_size": 32,
                                                           "symmetric": symmetric}]})
        compress_to_dir(str(tiny_llama_dir), [recipe], tmp_path / f"c{b}", settings)
        pack_to_dir(str(tmp_path / f"c{b}"), tmp_path / f"p{b}")
        sizes[b] = (tmp_path / f"p{b}" / PACKED_FILE).stat().st_size
    packed = load_model(tmp_path / f"p{bits}").model
    int4 = {n: m for n, m in packed.named_modules() if getattr(m, "format", None) == "int4"}
    weights = sum(m.in_features * m.out_features for m in int4.values())
    assert sizes[4] - sizes[bits] == pytest.approx(weights * (4 - bits) / 8, rel=0.01)
    if not symmetric:  # the check in transformers would fail: refused first, with the way out
        with pytest.raises(SlimkitError, match="--no-verify"):
            export_model(str(tmp_path / f"p{bits}"), tmp_path / "ct", "compressed-tensors", ExportSettings())
        assert not (tmp_path / "ct").exists()
    export_model(str(tmp_path / f"p{bits}"), tmp_path / "ct", "compressed-tensors", ExportSettings(verify=False))
    for name, mod in int4.items():
        assert torch.allclose(_decompressed(tmp_path / "ct", name, bits, symmetric, 32), mod.dequantize(),
                              rtol=1e-2, atol=1e-6), name  # scales written in the export's dtype
    ids = torch.randint(0, 200, (1, 24), generator=torch.Generator().manual_seed(0))
    fake = _logits(load_model(tmp_path / f"c{bits}").model, ids)
    outputs = [_logits(packed, ids)] + ([_logits(load_exported(tmp_path / "ct", "compressed-tensors"), ids)]
                                        if symmetric else [])
    for other in outputs:
        assert (fake - other).abs().max() <= 0.02 * fake.abs().max()
