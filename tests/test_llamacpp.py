"""llama.cpp runs what slimkit exports (the `peers` tier: `make test-peers`, after `make peers`)."""

from __future__ import annotations

import pytest

from slimkit.benchmarks.llamacpp import chunked_perplexity, llamacpp_perplexity, tool

pytestmark = [
    pytest.mark.peers,
    pytest.mark.skipif(tool("llama-perplexity") is None,
                       reason="llama.cpp's tools are not built: run `make peers` (then `make test-peers`)"),
]

RTN4_ASYM = {"name": "rtn-int4-g64-asym", "steps": [
    {"method": "rtn_quantize", "bits": 4, "group_size": 64, "symmetric": False}]}


@pytest.mark.parametrize("recipe, gguf_type, stored", [
    ("rtn-int4-g64", "auto", "Q4_0 (codes kept)"),  # symmetric int4 codes are Q4_0 blocks, bit for bit
    (RTN4_ASYM, "auto", "Q4_1 (codes kept)"),  # asymmetric ones are Q4_1 blocks
    ("rtn-int8", "auto", "Q8_0"),  # per-channel int8 re-blocked by 32 (not lossless)
    ("rtn-int4-g64", "f16", "F16"),  # the dequantized weights in half precision
])
def test_llamacpp_scores_a_slimkit_gguf_as_slimkit_scores_the_same_weights(smollm2_first_load, tmp_path, recipe,
                                                                          gguf_type, stored):
    """SmolLM2 -> compress -> pack -> GGUF of each type slimkit writes: llama.cpp's ppl and
    slimkit's ppl of the compressed weights, on the same chunks, agree within 1%."""
    from slimkit.data import load_split
    from slimkit.export.job import export_model
    from slimkit.formats.pack_dir import pack_to_dir
    from slimkit.models import load_model
    from slimkit.protocol import EvalSettings
    from slimkit.recipes import get_recipe, parse_recipe
    from slimkit.workflow import compress_to_dir

    recipe = parse_recipe(recipe) if isinstance(recipe, dict) else get_recipe(recipe)
    compress_to_dir("smollm2-135m", [recipe], tmp_path / "c", EvalSettings(max_windows=1))
    pack_to_dir(str(tmp_path / "c"), tmp_path / "p")
    result = export_model(str(tmp_path / "p"), tmp_path / "g", "gguf", gguf_type=gguf_type, verify=False)
    assert result["tensors_by_type"].get(stored, 0) >= 30 * 7, result["tensors_by_type"]  # every block linear
    text = "\n\n".join(d.text for d in load_split().evaluation[:120])
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")

    theirs = llamacpp_perplexity(tmp_path / "g" / "model.gguf", tmp_path / "text.txt", ctx=512, chunks=8)
    compressed = load_model(str(tmp_path / "c"))  # the same weights, dequantized, in transformers
    tokens = compressed.tokenizer.encode(text, add_special_tokens=False)  # SmolLM2's GGUF adds no BOS
    ours = chunked_perplexity(compressed.model, tokens, ctx=512, chunks=8)
    assert abs(theirs / ours - 1) < 0.01, (theirs, ours)
