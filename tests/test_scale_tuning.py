"""Scale tuning after GPTQ or AutoRound (codes fixed, each group's scale trained to the dense output) against the
textbook answer (least squares in the scales, one linear), on a tiny model through the gptq step,
and on SmolLM2's first block."""

import pytest
import torch

from conftest import OneLinear, tiny_llama
from slimkit.calibration.block_data import BlockData
from slimkit.calibration.block_fit import FitSettings
from slimkit.numerics.rtn import QuantSpec, dequantize, rtn_quantize
from slimkit.quantization.scale_tuning import CodedLinear, tune_scales
from slimkit.recipes import RunResources, compress, parse_recipe


def _least_squares_scales(x: torch.Tensor, y: torch.Tensor, q: torch.Tensor, group: int) -> torch.Tensor:
    """Per row r, with the codes fixed the output is linear in the row's scales: y_r = sum_g s_rg z_rg,
    z_rg = x[:, g] @ q[r, g]. The scales minimising |y_r - Z s_r|^2 (normal equations)."""
    rows, cols = q.shape
    scales = torch.zeros(rows, cols // group, dtype=torch.float64)
    xg = x.double().reshape(len(x), cols // group, group)
    for r in range(rows):
        z = torch.einsum("ngc,gc->ng", xg, q[r].double().reshape(cols // group, group))
        scales[r] = torch.linalg.solve(z.T @ z, z.T @ y[:, r].double())
    return scales.float()


def test_scale_tuning_of_one_linear_reaches_least_squares_scales():
    """One linear at 3 bits (RTN codes, fixed), correlated inputs: trained on every window each step,
    the scales reach the least-squares optimum's error within 2%, where RTN's scales are well above
    it; the codes do not change and the weight is what the new parameters decode to."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 32, generator=g)
    x = torch.randn(16, 32, 32, generator=g) @ (torch.randn(32, 32, generator=g) / 4 + torch.eye(32))
    spec = QuantSpec(3, group_size=8)
    w_hat, params = rtn_quantize(w, spec)
    block = OneLinear(w_hat)
    batches = list(x.split(4))
    data = BlockData(lambda i: (batches[i], (), {}), [b @ w.T for b in batches])
    flat_x, flat_y = x.reshape(-1, 32), x.reshape(-1, 32) @ w.T

    def error(weight):
        return float((flat_x @ weight.T - flat_y).pow(2).mean())

    best = _least_squares_scales(flat_x, flat_y, params.q, 8)
    optimum = error(dequantize(params.q, best, None, spec))
    new, result = tune_scales(block, {"proj": CodedLinear(block.proj, params)}, data,
                              FitSettings(iters=600, lr=0.02, batch=16))
    reached = error(block.proj.weight.detach())
    assert result.kept and result.error_after < result.error_before
    assert error(w_hat) > 1.2 * optimum  # measured: 1.26x
    assert optimum <= reached + 1e-6 <= 1.02 * optimum
    assert torch.equal(new["proj"].q, params.q) and new["proj"].scale.dtype == torch.float16
    torch.testing.assert_close(block.proj.weight.detach(), dequantize(new["proj"].q, new["proj"].scale, None, spec))


def _windows(n=8, seqlen=32, vocab=96):
    return torch.randint(3, vocab, (n, seqlen), generator=torch.Generator().manual_seed(0))


GPTQ = {"method": "gptq", "bits": 3, "group_size": 32, "full_range": True}
AUTOROUND = {"method": "autoround", "bits": 3, "group_size": 32, "full_range": True, "iters": 10, "batch": 4}


@pytest.mark.parametrize("step,floats", [(GPTQ, False), (GPTQ, True), (AUTOROUND, False)],
                         ids=["gptq", "gptq-floats", "autoround"])
def test_tuned_scales_lower_the_models_error_and_keep_the_codes_decodable(step, floats):
    """Tiny model, GPTQ or AutoRound int3 with and without scale tuning after it: the tuned model is
    closer to the dense one; block 0's codes are the method's own (tuning changes scales only), every
    weight is exactly what its stored codes and scales decode to, and the norm weights move only with
    `floats`."""
    windows = _windows()
    dense = tiny_llama()
    reference = dense(windows).logits.detach()
    errors, results, models = {}, {}, {}
    for name, extra in [("plain", {}), ("tuned", {"tune_scales": {"iters": 40, "lr": 3e-3, "batch": 4,
                                                                 "floats": floats}})]:
        model = tiny_llama()
        results[name] = compress(model, parse_recipe({"steps": [{**step, **extra}]}),
                                 run=RunResources(calibration=lambda: windows))
        errors[name], models[name] = float((model(windows).logits.detach() - reference).pow(2).mean()), model
    assert errors["tuned"] < errors["plain"]
    records = results["tuned"].records
    for n, record in records.items():
        weight = models["tuned"].get_submodule(n).weight.detach()
        p = record.quant
        torch.testing.assert_close(weight, dequantize(p.q, p.scale, p.zero, p.spec), rtol=0, atol=0)
        if n.startswith("model.layers.0."):
            assert torch.equal(p.q, results["plain"].records[n].quant.q)
    assert all(r.notes[-1].startswith("scales tuned") for r in records.values())
    norms = [(n, p) for n, p in models["tuned"].named_parameters() if n.endswith("layernorm.weight")]
    moved = [not torch.equal(p, dense.get_parameter(n)) for n, p in norms]
    assert all(moved) if floats else not any(moved)


def test_scale_tuning_is_refused_with_several_processes(monkeypatch):
    from slimkit.calibration import distributed
    from slimkit.errors import RecipeError

    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    recipe = parse_recipe({"steps": [{**GPTQ, "tune_scales": {"iters": 2}}]})
    with pytest.raises(RecipeError, match="runs in one process"):
        compress(tiny_llama(), recipe, run=RunResources(calibration=_windows))


@pytest.mark.real_model
def test_scale_tuning_on_smollm2_first_block_lowers_its_output_error(smollm2):
    """SmolLM2's block 0 on real text (8 windows of 64 tokens), GPTQ int4 g64 then 20 steps of scale
    tuning: the block's output error drops below GPTQ's (the other blocks stay dense)."""
    from slimkit.data import calibration_windows
    from slimkit.data.corpus import load_split

    ids = calibration_windows(smollm2.tokenizer, load_split(), 8, 64)
    recipe = parse_recipe({"steps": [{"method": "gptq", "bits": 4, "group_size": 64, "full_range": True,
                                      "ignore": ["model.layers.[1-9]*"], "tune_scales": {"iters": 20, "batch": 4}}]})
    result = compress(smollm2.model, recipe, run=RunResources(calibration=lambda: ids))
    notes = {n: r.notes[-1] for n, r in result.records.items() if r.quant is not None}
    assert notes and all(n.startswith("model.layers.0.") for n in notes)
    ratio = float(next(iter(notes.values())).split(" x")[1].split(" ")[0].rstrip(")"))
    assert ratio < 0.98, notes
