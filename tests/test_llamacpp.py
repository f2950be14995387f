"""llama.cpp runs what slimkit exports (the `peers` tier: `make test-peers`, after `make peers`)."""

from __future__ import annotations

import pytest

from slimkit.benchmarks.llamacpp import chunked_perplexity, llamacpp_perplexity, tool

pytestmark = [
    pytest.mark.peers,
    pytest.mark.skipif(tool("llama-perplexity") is None,
                       reason="llama.cpp's tools are not built: run `make peers` (then `make test-peers`)"),
]


def test_llamacpp_scores_a_slimkit_gguf_as_slimkit_scores_the_same_weights(smollm2_first_load, tmp_path):
    """SmolLM2 -> RTN int4 g64 -> pack -> GGUF (Q4_0 blocks are the int4 codes): llama.cpp's ppl
    and slimkit's ppl of the compressed weights, on the same chunks, agree within 1%."""
    from slimkit.data import load_split
    from slimkit.export.job import export_model
    from slimkit.formats.pack_dir import pack_to_dir
    from slimkit.models import load_model
    from slimkit.protocol import EvalSettings
    from slimkit.recipes import get_recipe
    from slimkit.workflow import compress_to_dir

    compress_to_dir("smollm2-135m", [get_recipe("rtn-int4-g64")], tmp_path / "c", EvalSettings(max_windows=1))
    pack_to_dir(str(tmp_path / "c"), tmp_path / "p")
    export_model(str(tmp_path / "p"), tmp_path / "g", "gguf", verify=False)
    text = "\n\n".join(d.text for d in load_split().evaluation[:120])
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")

    theirs = llamacpp_perplexity(tmp_path / "g" / "model.gguf", tmp_path / "text.txt", ctx=512, chunks=8)
    compressed = load_model(str(tmp_path / "c"))  # the same weights, dequantized, in transformers
    tokens = compressed.tokenizer.encode(text, add_special_tokens=False)  # SmolLM2's GGUF adds no BOS
    ours = chunked_perplexity(compressed.model, tokens, ctx=512, chunks=8)
    assert abs(theirs / ours - 1) < 0.01, (theirs, ours)
