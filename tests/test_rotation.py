"""Rotations (QuaRot/SpinQuant-style, fused into the weights): the matrices against their textbook
definitions, the rotated model against the original, the refusals, and the step on SmolLM2."""

import pytest
import torch

from conftest import tiny_llama
from slimkit.errors import RecipeError, UnsupportedArchitectureError
from slimkit.models import adapter_for
from slimkit.models.layouts import as_linears
from slimkit.quantization.rotate_model import rotate_model
from slimkit.quantization.rotation import (
    randomized_hadamard,
    rotate_head_inputs,
    rotate_head_outputs,
    sylvester_hadamard,
)
from slimkit.recipes import RunResources, compress, parse_recipe
from tiny_archs import tiny_model


def test_sylvester_hadamard_is_the_closed_form():
    """H[i, j] = (-1)^popcount(i & j) / sqrt(n), the closed form of Sylvester's construction."""
    n = 32
    expected = torch.tensor([[(-1) ** bin(i & j).count("1") for j in range(n)] for i in range(n)],
                            dtype=torch.float64) / n**0.5
    torch.testing.assert_close(sylvester_hadamard(n), expected, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="power of two"):
        sylvester_hadamard(24)


@pytest.mark.parametrize("n", [1, 7, 64, 96, 576])
def test_randomized_hadamard_is_orthogonal_and_seeded(n):
    q = randomized_hadamard(n, seed=3)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(randomized_hadamard(n, seed=3), q, rtol=0, atol=0)
    if n > 1:
        assert not torch.equal(randomized_hadamard(n, seed=4), q)
    if n == 64:  # a power of two: a signed Hadamard matrix, every entry +-1/sqrt(n)
        torch.testing.assert_close(q.abs(), torch.full((n, n), n**-0.5, dtype=torch.float64))


def test_head_rotations_are_block_diagonal_products():
    g = torch.Generator().manual_seed(0)
    h = randomized_hadamard(8, seed=1)
    blocks = torch.block_diag(*[h] * 3)
    w_rows = torch.randn(24, 10, generator=g, dtype=torch.float64)
    w_cols = torch.randn(5, 24, generator=g, dtype=torch.float64)
    torch.testing.assert_close(rotate_head_outputs(w_rows, h), blocks.T @ w_rows)
    torch.testing.assert_close(rotate_head_inputs(w_cols, h), w_cols @ blocks)
    with pytest.raises(ValueError, match="do not split into heads"):
        rotate_head_outputs(torch.zeros(20, 4, dtype=torch.float64), h)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "phi3", "granite", "mixtral", "qwen2_moe"])
def test_rotated_model_computes_the_same_function(model_type):
    """Norms folded, residual stream and values rotated: the logits stay (float32 round-off only),
    every norm is left with a unit weight and the weights did change. Qwen2 has q/k/v biases, Qwen3
    head norms, Phi-3 a fused qkv (values then not rotated), Mixtral/Qwen2-MoE experts and routers."""
    model = as_linears(tiny_model(model_type, tie_word_embeddings=model_type == "llama"))
    adapter = adapter_for(model)
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    before = _logits(model, ids)
    q_before = adapter.get_blocks(model)[0].get_submodule(adapter.q_proj).weight.clone()
    report = rotate_model(model, adapter, seed=0, untie=True)
    after = _logits(model, ids)
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()
    block = adapter.get_blocks(model)[0]
    assert not torch.allclose(block.get_submodule(adapter.q_proj).weight, q_before, atol=1e-3)
    for path in adapter.block_norms:
        assert torch.equal(block.get_submodule(path).weight, torch.ones_like(block.get_submodule(path).weight))
    assert (report.head_dim is None) == (model_type == "phi3")
    assert report.untied_head == (model_type == "llama")


def test_a_tied_head_stays_tied_unless_asked_only_the_values_rotate():
    """By default a tied model keeps its one vocabulary matrix: norms and residual stream untouched,
    each head's values rotated (v_proj and o_proj change, q_proj does not), the same function."""
    model = as_linears(tiny_model("llama", tie_word_embeddings=True))
    adapter = adapter_for(model)
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    before = _logits(model, ids)
    block = adapter.get_blocks(model)[0]
    q, v = (block.get_submodule(p).weight.clone() for p in (adapter.q_proj, adapter.v_proj))
    report = rotate_model(model, adapter, seed=0)
    assert (_logits(model, ids) - before).abs().max() <= 1e-5 * before.abs().max()
    assert not report.untied_head and not report.stream_rotated and report.head_dim is not None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.tie_word_embeddings is True
    assert torch.equal(block.get_submodule(adapter.q_proj).weight, q)
    assert not torch.allclose(block.get_submodule(adapter.v_proj).weight, v, atol=1e-3)
    assert any("tied: untie" in note for note in report.notes)


@pytest.mark.parametrize("model_type, reason", [
    ("gemma", "pre-norm blocks"),  # (1 + w) norms take no folded weight
    ("olmo2", "pre-norm blocks"),  # norms after the projections
    ("phi", "pre-norm blocks"),  # parallel attention and MLP on one LayerNorm
    ("stablelm", "RMSNorm"),
    ("gpt2", "RMSNorm"),
])
def test_rotation_refuses_what_it_would_break_before_changing_anything(model_type, reason):
    model = as_linears(tiny_model(model_type))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedArchitectureError, match=reason):
        rotate_model(model, adapter_for(model))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_rotate_comes_before_codes_and_turns_the_whole_stream():
    model = tiny_llama()
    late = parse_recipe({"steps": [{"method": "rtn_quantize", "bits": 4}, {"method": "rotate"}]})
    with pytest.raises(RecipeError, match=r"steps\[1\] \(rotate\) rewrites every weight"):
        compress(model, late)
    with pytest.raises(RecipeError, match="ignore, include_lm_head and include_embeddings do not apply"):
        parse_recipe({"steps": [{"method": "rotate", "ignore": ["*.o_proj"]}]})


def test_rotate_step_on_smollm2_keeps_the_function_and_spreads_outliers(smollm2, tmp_path):
    """SmolLM2 (tied head, 576 = 64 x 9 channels): the rotate step keeps the logits on real text,
    unties the head, makes the weights more Gaussian (smaller max / rms per group of 64), and the
    result saves and reloads in plain transformers with the same logits."""
    from transformers import AutoModelForCausalLM

    model, tok = smollm2.model, smollm2.tokenizer
    ids = tok("The committee met on Tuesday to discuss the budget for the new library.", return_tensors="pt").input_ids
    before = _logits(model, ids)
    linears = adapter_for(model).linears(model)

    def peakiness():  # mean over linears of max|w| / rms(w) within groups of 64 inputs
        ratios = [(w.abs().amax(-1) / w.pow(2).mean(-1).sqrt()).mean()
                  for w in (m.weight.detach().reshape(m.weight.shape[0], -1, 64) for m in linears.values())]
        return float(torch.stack(ratios).mean())

    peak_before = peakiness()
    result = compress(model, parse_recipe({"steps": [{"method": "rotate", "tied": "untie"}]}), run=RunResources())
    after = _logits(model, ids)
    assert (after - before).abs().max() <= 1e-3 * before.abs().max()
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.config.tie_word_embeddings is False
    assert peakiness() < peak_before  # measured 2.71 -> 2.61 (64 Gaussian samples: about 2.5)
    detail = result.details[0]
    assert detail["parameters_after"] - detail["parameters_before"] == model.lm_head.weight.numel()
    assert all("rotate" in result.records[name].methods[-1] for name in linears)
    model.save_pretrained(tmp_path / "rotated")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "rotated").eval()
    torch.testing.assert_close(_logits(again, ids), after, rtol=0, atol=1e-4)


ROTATE_AUTOROUND = {"name": "rot-autoround-int4-g64", "steps": [
    {"method": "rotate", "tied": "untie"}, {"method": "autoround", "bits": 4, "group_size": 64, "full_range": True, "iters": 5}]}
ROTATE_SCALES = {"name": "rot-gptq-scales-int4-g64", "steps": [
    {"method": "rotate", "tied": "untie"}, {"method": "gptq", "bits": 4, "group_size": 64, "full_range": True,
                           "tune_scales": {"iters": 5, "floats": True}}]}
AUTOROUND_SCALES = {"name": "autoround-scales-int4-g64", "steps": [  # no rotation: scales after learned rounding
    {"method": "autoround", "bits": 4, "group_size": 64, "full_range": True, "iters": 5, "targets": "dense-model",
     "tune_scales": {"iters": 5, "floats": True}}]}


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("recipe", ["rot-gptq-int4-g64", "rot-autoround-int4-g64", "rot-gptq-scales-int4-g64",
                                    "autoround-scales-int4-g64"])
def test_rotated_quantized_smollm2_packs_and_exports_with_the_same_perplexity(smollm2_first_load, tmp_path, recipe):
    """rot-gptq-int4-g64, rotate + AutoRound int4 (5 steps), rotate + GPTQ with 5 steps of scale (and
    norm) tuning, and AutoRound with 5 steps of scale and norm tuning, on SmolLM2 (short calibration) ->
    packed -> compressed-tensors and GGUF: each export's ppl within 1% of the packed model's (the
    untied head travels as its own tensor)."""
    from slimkit.compression.memory import compress_to_dir
    from slimkit.compression.pack_dir import pack_to_dir
    from slimkit.export.job import ExportSettings, export_model
    from slimkit.protocol import EvalSettings
    from slimkit.recipes import get_recipe

    settings = EvalSettings(seqlen=256, max_windows=2, calibration_windows=8, calibration_seqlen=256)
    short = {"rot-autoround-int4-g64": ROTATE_AUTOROUND, "rot-gptq-scales-int4-g64": ROTATE_SCALES,
             "autoround-scales-int4-g64": AUTOROUND_SCALES}
    chosen = parse_recipe(short[recipe]) if recipe in short else get_recipe(recipe)
    compress_to_dir("smollm2-135m", [chosen], tmp_path / "rot", settings)
    pack_to_dir(str(tmp_path / "rot"), tmp_path / "packed", fmt="auto")
    for to in ("compressed-tensors", "gguf"):
        check = export_model(str(tmp_path / "packed"), tmp_path / to, to, ExportSettings(windows=2))["verify"]
        assert abs(check["relative_diff"]) < 0.01, (to, check)


def test_a_recipe_after_rotate_in_the_same_run_starts_from_the_tied_model(tiny_llama_dir, tmp_path):
    """Recipes of one run each start from the model as loaded: weights and head tying (ModelSnapshot)."""
    import json

    from slimkit.compression.memory import compress_to_dir
    from slimkit.protocol import EvalSettings
    from slimkit.recipes import get_recipe

    settings = EvalSettings(seqlen=64, max_windows=1, calibration_windows=2, calibration_seqlen=64)
    rotate = parse_recipe({"name": "rot", "steps": [{"method": "rotate", "tied": "untie"}]})
    compress_to_dir(str(tiny_llama_dir), [rotate, get_recipe("rtn-int4-g64")], tmp_path / "out", settings)
    assert json.loads((tmp_path / "out" / "rot" / "config.json").read_text())["tie_word_embeddings"] is False
    assert json.loads((tmp_path / "out" / "rtn-int4-g64" / "config.json").read_text())["tie_word_embeddings"] is True
