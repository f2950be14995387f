"""Real-model checks on the packaged SmolLM2-135M and all-MiniLM-L6-v2 (small eval slices)."""

import json

import pytest

from slimkit.evaluation import EmbeddingProtocol, PerplexityProtocol, perplexity, sentence_embeddings, similarity
from slimkit.recipes import RunResources, compress, get_recipe

pytestmark = pytest.mark.real_model
QUICK = PerplexityProtocol(seqlen=512, max_windows=4)


def test_smollm2_dense_ppl_sane_and_magnitude_50_raises_it(smollm2, split):
    dense = perplexity(smollm2.model, smollm2.tokenizer, split, QUICK)
    assert 5 < dense.ppl < 40, dense
    assert dense.tokens == 4 * 511
    compress(smollm2.model, get_recipe("magnitude-50"))
    pruned = perplexity(smollm2.model, smollm2.tokenizer, split, QUICK)
    assert pruned.ppl > 1.2 * dense.ppl, (dense.ppl, pruned.ppl)


def test_smollm2_int8_is_nearly_lossless(smollm2, split):
    dense = perplexity(smollm2.model, smollm2.tokenizer, split, PerplexityProtocol(512, 2))
    compress(smollm2.model, get_recipe("rtn-int8"))
    q = perplexity(smollm2.model, smollm2.tokenizer, split, PerplexityProtocol(512, 2))
    assert abs(q.ppl / dense.ppl - 1) < 0.02, (dense.ppl, q.ppl)


def test_minilm_embedding_similarity_orders_methods(split):
    from slimkit.models import load_model

    proto = EmbeddingProtocol(n_texts=64)
    results = {}
    for recipe in ("rtn-int8", "magnitude-2of4"):
        lm = load_model("minilm-l6")
        ref = sentence_embeddings(lm.model, lm.tokenizer, split, proto)
        compress(lm.model, get_recipe(recipe))
        results[recipe] = similarity(ref, sentence_embeddings(lm.model, lm.tokenizer, split, proto), split.split_hash, 0)
    assert results["rtn-int8"].mean_cosine > 0.99
    assert results["magnitude-2of4"].mean_cosine < results["rtn-int8"].mean_cosine


def test_compress_smollm2_writes_loadable_dir(smollm2_first_load, tmp_path):
    from transformers import AutoModelForCausalLM

    from slimkit.compression.memory import compress_to_dir
    from slimkit.protocol import EvalSettings

    out = tmp_path / "int4"
    [report] = compress_to_dir("smollm2-135m", [get_recipe("rtn-int4-g64")], out, EvalSettings(max_windows=2))
    assert report.compressed.value > report.baseline.value
    # int4 g64 with fp16 scales: 0.53 bytes per block linear weight; the tied head/embedding (one
    # tensor) in Q8_0, 34 bytes per 32 weights (576-wide rows do not tile Q6_K); norms stay fp32
    head = 49152 * 576
    linear_params = report.compression.compressed_parameters - head
    expected = report.size.dense_bytes - linear_params * (4 - 0.5 - 2 / 64) - head * (4 - 34 / 32)
    assert report.size.packed_bytes == pytest.approx(expected, rel=1e-6)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 30
    assert json.loads((out / "report.json").read_text())["recipe"]["name"] == "rtn-int4-g64"


@pytest.mark.slow
def test_full_protocol_demo_ordering(smollm2, split):
    """Full protocol (all 200 windows): 2:4 magnitude hurts more than int4 g64 RTN."""
    full = PerplexityProtocol(512, None)
    dense = perplexity(smollm2.model, smollm2.tokenizer, split, full)
    state = {k: v.clone() for k, v in smollm2.model.state_dict().items()}
    compress(smollm2.model, get_recipe("rtn-int4-g64"))
    int4 = perplexity(smollm2.model, smollm2.tokenizer, split, full)
    smollm2.model.load_state_dict(state)
    compress(smollm2.model, get_recipe("magnitude-2of4"))
    nm = perplexity(smollm2.model, smollm2.tokenizer, split, full)
    assert dense.ppl < int4.ppl < nm.ppl


@pytest.mark.slow  # 65 s; the default tier keeps the SmolLM2 checks above (dense, magnitude, int8, compress)
def test_calibrated_methods_beat_their_baselines_on_smollm2(smollm2, split):
    """Small calibration (8 x 256 tokens): the literature's orderings already show."""
    from slimkit.data import calibration_windows

    windows = calibration_windows(smollm2.tokenizer, split, 8, 256, seed=0)
    state = {k: v.clone() for k, v in smollm2.model.state_dict().items()}
    ppl = {}
    for name in ("magnitude-50", "sparsegpt-50", "rtn-int3-g64", "gptq-int3-g64"):
        smollm2.model.load_state_dict(state)
        result = compress(smollm2.model, get_recipe(name), smollm2.adapter, RunResources(calibration=lambda: windows))
        ppl[name] = perplexity(smollm2.model, smollm2.tokenizer, split, PerplexityProtocol(512, 4)).ppl
        sparsity = sum(int((smollm2.model.get_submodule(n).weight == 0).sum()) for n in result.records) / sum(
            smollm2.model.get_submodule(n).weight.numel() for n in result.records)
        if "50" in name:
            assert sparsity == pytest.approx(0.5, abs=0.002), (name, sparsity)
    assert ppl["sparsegpt-50"] < 0.5 * ppl["magnitude-50"], ppl
    assert ppl["gptq-int3-g64"] < ppl["rtn-int3-g64"], ppl
