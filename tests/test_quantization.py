import pytest
import torch

from conftest import tiny_llama
from slimkit.errors import ShapeError
from slimkit.quantization.rtn import QuantSpec, bytes_per_weight, compute_qparams, dequantize, rtn_quantize
from slimkit.recipes import compress, parse_recipe

SPECS = [
    QuantSpec(8, True, None),
    QuantSpec(4, True, 64),
    QuantSpec(4, False, 32),
    QuantSpec(3, True, 64),
    QuantSpec(2, False, None),
    QuantSpec(4, True, 64, torch.bfloat16),
]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_rtn_round_trip_error_bound(spec):
    torch.manual_seed(0)
    w = torch.randn(48, 192) * torch.rand(48, 1)  # rows of different scales
    w_hat, params = rtn_quantize(w, spec)
    group = spec.group_of(w.shape[1])
    s = params.scale.float().repeat_interleave(group, dim=1)
    # every weight within half a step (plus float rounding) of its quantized value
    assert ((w - w_hat).abs() <= s / 2 + 1e-6).all()
    assert params.q.min() >= spec.qmin and params.q.max() <= spec.qmax
    assert torch.equal(dequantize(params.q, params.scale, params.zero, spec), w_hat)
    per_group = w_hat.view(w.shape[0], -1, group).flatten(0, 1)
    assert max(g.unique().numel() for g in per_group) <= 2**spec.bits


def test_more_bits_less_error():
    w = torch.randn(64, 256)
    errs = [float((rtn_quantize(w, QuantSpec(b, True, 64))[0] - w).pow(2).mean()) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < errs[0] / 1000


def test_asymmetric_keeps_zero_exact():
    w = torch.randn(16, 64).clamp(min=0)  # one-sided groups with many exact zeros
    w_hat, params = rtn_quantize(w, QuantSpec(4, False, 32))
    assert params.zero is not None
    assert (w_hat[w == 0] == 0).all()


def test_all_zero_group_is_fine():
    w = torch.zeros(4, 64)
    w_hat, params = rtn_quantize(w, QuantSpec(4, False, 32))
    assert torch.equal(w_hat, w) and torch.isfinite(params.scale.float()).all()


def test_group_must_divide_input():
    with pytest.raises(ShapeError, match="576 is not divisible by group_size 128; try group_size 32 or 64"):
        compute_qparams(torch.randn(8, 576), QuantSpec(4, True, 128))


def test_bytes_per_weight_arithmetic():
    assert bytes_per_weight(QuantSpec(4, True, 64, torch.bfloat16), 576) == pytest.approx(0.5 + 2 / 64)
    assert bytes_per_weight(QuantSpec(8, True, None, torch.float16), 576) == pytest.approx(1 + 2 / 576)


def test_quantize_after_prune_keeps_mask():
    model = tiny_llama()
    recipe = parse_recipe({"steps": [{"method": "magnitude_prune", "pattern": "2:4"},
                                     {"method": "rtn_quantize", "bits": 4, "group_size": 32}]})
    result = compress(model, recipe)
    for name, rec in result.records.items():
        w = model.get_submodule(name).weight
        assert (w[~rec.mask] == 0).all()
        assert rec.quant is not None and rec.methods == ["magnitude 2:4", "RTN int4 g32 sym"]
