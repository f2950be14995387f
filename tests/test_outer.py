"""The whole file: a quantize_outer step types the head and the token embedding as llama-quantize
does, pack stores those codes once (a tied embedding reads the head's rows, an untied one its own
blocks), and the GGUF export writes them as they are."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import tiny_llama
from slimkit.compression.memory import compress_to_dir
from slimkit.compression.pack_dir import pack_to_dir
from slimkit.errors import RecipeError
from slimkit.export.job import ExportSettings, export_model, load_exported
from slimkit.formats import PACKED_FILE
from slimkit.formats.embedding import PackedEmbedding, RowsOfHead
from slimkit.models import load_model
from slimkit.protocol import EvalSettings
from slimkit.recipes import get_recipe, parse_recipe

SETTINGS = EvalSettings(seqlen=32, max_windows=2, calibration_windows=2, calibration_seqlen=32)
INT4_WHOLE_FILE = {"name": "int4-whole", "steps": [{"method": "rtn_quantize", "bits": 4, "group_size": 32},
                                                   {"method": "quantize_outer"}]}


def _model_dir(tmp_path_factory, tokenizer, name: str, **config):
    path = tmp_path_factory.mktemp(name)
    tiny_llama(vocab_size=len(tokenizer), **config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tied_256(tmp_path_factory, smollm2_tokenizer):
    """Tied, 256-wide rows: the head (and so the embedding) in Q6_K."""
    return _model_dir(tmp_path_factory, smollm2_tokenizer, "tied-256", hidden_size=256, intermediate_size=256)


@pytest.fixture(scope="module")
def untied_64(tmp_path_factory, smollm2_tokenizer):
    """Untied, 64-wide rows: the head in Q8_0 (Q6_K's blocks do not tile 64), the embedding in Q4_0."""
    return _model_dir(tmp_path_factory, smollm2_tokenizer, "untied-64", tie_word_embeddings=False)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _compress_and_pack(source, tmp_path):
    compress_to_dir(str(source), [parse_recipe(INT4_WHOLE_FILE)], tmp_path / "c", SETTINGS)
    summary = pack_to_dir(str(tmp_path / "c"), tmp_path / "p")
    with safe_open(str(tmp_path / "p" / PACKED_FILE), framework="pt") as f:
        keys, header = set(f.keys()), json.loads(f.metadata()["slimkit_packed"])
    return summary, keys, header


def _gguf_tensors(path) -> dict:
    import gguf

    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.mark.slow  # 24 s
def test_a_tied_head_is_q6_k_stored_once_and_exported_as_its_codes(tied_256, tmp_path):
    summary, keys, header = _compress_and_pack(tied_256, tmp_path)
    layers = json.loads((tmp_path / "c" / "report.json").read_text())["compression"]["layers"]
    assert [(r["name"], r["bits"]) for r in layers if r["kind"] in ("lm_head", "embedding")] == [("lm_head", "Q6_K")]
    assert header["layers"]["lm_head"]["ggml_type"] == "Q6_K" and header["shared_rows"] == {
        "model.embed_tokens": "lm_head"}
    assert "lm_head.blocks" in keys and not any(k.startswith("model.embed_tokens") for k in keys)
    packed = load_model(tmp_path / "p").model
    assert isinstance(packed.get_input_embeddings(), RowsOfHead)
    ids = torch.randint(0, 4000, (1, 24), generator=torch.Generator().manual_seed(0))
    fake = _logits(load_model(tmp_path / "c").model, ids)
    assert (fake - _logits(packed, ids)).abs().max() <= 0.02 * fake.abs().max()
    assert summary["file_bits_per_weight"] == pytest.approx(summary["file_bytes"] * 8 / summary["parameters"])
    export_model(str(tmp_path / "p"), tmp_path / "g", "gguf", ExportSettings(verify=False))
    tensors = _gguf_tensors(tmp_path / "g" / "model.gguf")
    assert tensors["token_embd.weight"].tensor_type.name == "Q6_K" and "output.weight" not in tensors
    blocks = packed.lm_head.blocks.numpy()
    assert np.array_equal(np.asarray(tensors["token_embd.weight"].data).reshape(blocks.shape), blocks)  # kept
    assert (fake - _logits(load_exported(tmp_path / "g", "gguf"), ids)).abs().max() <= 0.02 * fake.abs().max()


def test_an_untied_embedding_is_packed_in_its_own_blocks(untied_64, tmp_path):
    summary, keys, header = _compress_and_pack(untied_64, tmp_path)
    assert header["layers"]["lm_head"]["ggml_type"] == "Q8_0"  # 64-wide rows: Q6_K falls back, as in llama.cpp
    assert header["embeddings"]["model.embed_tokens"]["ggml_type"] == "Q4_0"
    assert "model.embed_tokens.blocks" in keys and "model.embed_tokens.weight" not in keys
    assert summary["layers"]["model.embed_tokens"]["bytes_per_weight"] == pytest.approx(18 / 32)
    packed = load_model(tmp_path / "p").model
    assert isinstance(packed.get_input_embeddings(), PackedEmbedding)
    ids = torch.randint(0, 4000, (1, 24), generator=torch.Generator().manual_seed(1))
    fake = _logits(load_model(tmp_path / "c").model, ids)
    assert torch.equal(packed.get_input_embeddings()(ids), load_model(tmp_path / "c").model.get_input_embeddings()(ids))
    assert (fake - _logits(packed, ids)).abs().max() <= 0.02 * fake.abs().max()
    export_model(str(tmp_path / "p"), tmp_path / "g", "gguf", ExportSettings(verify=False))
    tensors = _gguf_tensors(tmp_path / "g" / "model.gguf")
    assert tensors["token_embd.weight"].tensor_type.name == "Q4_0" and tensors["output.weight"].tensor_type.name == "Q8_0"
    for name in ("compressed-tensors", "hf"):  # exports that store weights: the embedding's values, dense
        export_model(str(tmp_path / "p"), tmp_path / name, name, ExportSettings(verify=False))
        assert (fake - _logits(load_exported(tmp_path / name, name), ids)).abs().max() <= 0.02 * fake.abs().max()


def test_outer_options_are_checked():
    with pytest.raises(RecipeError, match="include_lm_head"):
        parse_recipe({"name": "x", "steps": [{"method": "quantize_outer", "include_lm_head": True}]})
    keep = parse_recipe({"name": "x", "steps": [{"method": "quantize_outer", "head": "dense", "embedding": "dense"}]})
    assert keep.steps[0].summary() == "head dense, embedding dense (round to nearest)"


def test_a_second_compress_reads_the_base_from_the_cache_with_no_forward_pass(untied_64, tmp_path, monkeypatch):
    """One base forward pass per window: the first run's dense evaluation records the base's
    distributions, which its compressed evaluation compares with; a second run on the same weights,
    split and window length reads the base's perplexity back from that cache."""
    import sys

    perplexity = sys.modules["slimkit.evaluation.perplexity"]  # the package exports a function of that name
    monkeypatch.setenv("SLIMKIT_CACHE", str(tmp_path / "cache"))
    passes = []
    forward = perplexity._forward_windows
    monkeypatch.setattr(perplexity, "_forward_windows", lambda model, windows, *a: passes.append(
        windows.shape[0]) or forward(model, windows, *a))
    recipe = parse_recipe({"name": "r", "steps": [{"method": "rtn_quantize", "bits": 8}]})
    first = compress_to_dir(str(untied_64), [recipe], tmp_path / "one", SETTINGS)[0]
    assert passes == [2, 2]  # the base's windows, then the compressed model's
    second = compress_to_dir(str(untied_64), [recipe], tmp_path / "two", SETTINGS)[0]
    assert passes == [2, 2, 2]  # only the compressed model ran
    assert second.baseline.value == first.baseline.value
    assert second.compressed.divergence.mean_kld == pytest.approx(first.compressed.divergence.mean_kld, rel=1e-6)


def test_a_2_of_4_int4_model_goes_to_gguf_as_q4_0_codes_not_f16(tied_256, tmp_path):
    """GGUF has no sparse type: the 2:4 layers' int4 values (a pruned weight is code 0) are written
    as the Q4_0 blocks of the dense codes, bit for bit, so the file is the size of an int4 model's."""
    import gguf

    compress_to_dir(str(tied_256), [get_recipe("magnitude-2of4-int4")], tmp_path / "c", SETTINGS)
    pack_to_dir(str(tmp_path / "c"), tmp_path / "p")
    packed = load_model(tmp_path / "p").model
    sparse = {n: m for n, m in packed.named_modules() if getattr(m, "format", None) == "2:4"}
    assert sparse and all(m.meta["values"] == "int4" for m in sparse.values())
    result = export_model(str(tmp_path / "p"), tmp_path / "g", "gguf", ExportSettings(verify=False))
    assert result["tensors_by_type"]["Q4_0 (codes kept)"] == len(sparse)
    assert not any(t.startswith("F16") for t in result["tensors_by_type"])
    tensors = _gguf_tensors(tmp_path / "g" / "model.gguf")
    down = tensors["blk.0.ffn_down.weight"]
    assert down.tensor_type.name == "Q4_0"
    rows, cols = sparse["model.layers.0.mlp.down_proj"].out_features, sparse["model.layers.0.mlp.down_proj"].in_features
    values = gguf.quants.dequantize(np.asarray(down.data), down.tensor_type).reshape(rows, cols)
    assert np.array_equal(values, sparse["model.layers.0.mlp.down_proj"].dequantize().numpy())


@pytest.mark.slow  # the peers tier's 16-architecture test runs Gemma end to end in llama.cpp too
def test_a_scaled_embedding_reads_the_tied_heads_rows_times_its_scale(tmp_path, smollm2_tokenizer):
    """Gemma multiplies its embedding rows by sqrt(hidden): packed, the embedding reads the tied
    head's rows and keeps that scale (saved and loaded back), so the packed model computes the
    compressed one's function."""
    from tiny_archs import tiny_model

    tiny_model("gemma", vocab_size=len(smollm2_tokenizer)).save_pretrained(tmp_path / "m")
    smollm2_tokenizer.save_pretrained(tmp_path / "m")
    compress_to_dir(str(tmp_path / "m"), [parse_recipe(INT4_WHOLE_FILE)], tmp_path / "c", SETTINGS)
    pack_to_dir(str(tmp_path / "c"), tmp_path / "p")
    packed = load_model(tmp_path / "p").model
    embedding = packed.get_input_embeddings()
    assert isinstance(embedding, RowsOfHead) and float(embedding.embed_scale) == pytest.approx(
        packed.config.hidden_size ** 0.5)
    ids = torch.randint(0, 4000, (1, 24), generator=torch.Generator().manual_seed(0))
    fake = _logits(load_model(tmp_path / "c").model, ids)
    assert (fake - _logits(packed, ids)).abs().max() <= 0.02 * fake.abs().max()
