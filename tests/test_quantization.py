import pytest
import torch

from conftest import tiny_llama
from slimkit.errors import RecipeError, ShapeError
from slimkit.numerics.rtn import QuantSpec, bytes_per_weight, compute_qparams, dequantize, rtn_quantize
from slimkit.recipes import compress, parse_recipe

SPECS = [
    QuantSpec(8, True, None),
    QuantSpec(4, True, 64),
    QuantSpec(4, False, 32),
    QuantSpec(3, True, 64),
    QuantSpec(2, False, None),
    QuantSpec(4, True, 64, torch.bfloat16),
    QuantSpec(3, True, 64, full_range=True),
    QuantSpec(8, True, None, full_range=True),
]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_rtn_round_trip_error_bound(spec):
    torch.manual_seed(0)
    w = torch.randn(48, 192) * torch.rand(48, 1)  # rows of different scales
    w_hat, params = rtn_quantize(w, spec)
    group = spec.group_of(w.shape[1])
    s = params.scale.float().abs().repeat_interleave(group, dim=1)
    # every weight within half a step (plus float rounding) of its quantized value; on the full-range
    # grid the side opposite the extreme reaches one level less, so there within one step
    assert ((w - w_hat).abs() <= (s if spec.full_range else s / 2) + 1e-6).all()
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


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_full_range_grid_against_its_definition(bits):
    """Per group, the weight of largest magnitude e decodes to itself on code -2^(b-1): the scale
    is -e / 2^(b-1) (negative when e > 0), then round-to-nearest clamped to the signed range."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(12, 128, generator=g) * torch.rand(12, 1, generator=g)
    spec = QuantSpec(bits, True, 32, torch.float32, full_range=True)
    w_hat, params = rtn_quantize(w, spec)
    for r in range(12):
        for k in range(4):
            group = w[r, 32 * k: 32 * (k + 1)]
            top, bottom = float(group.max()), float(group.min())
            extreme = top if top >= -bottom else bottom
            scale = -extreme / 2 ** (bits - 1)
            assert float(params.scale[r, k]) == pytest.approx(scale, rel=1e-6)
            codes = torch.clamp(torch.round(group / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            assert torch.equal(params.q[r, 32 * k: 32 * (k + 1)].float(), codes)
            assert float(w_hat[r, 32 * k: 32 * (k + 1)][group.abs().argmax()]) == pytest.approx(extreme, rel=1e-6)
    assert (params.scale < 0).any() and (params.scale > 0).any()


def test_full_range_has_the_finer_step_and_needs_symmetric_codes():
    """On Gaussian weights at 3 bits the step shrinks from absmax/3.5 to absmax/4: measured error
    about 25% lower than the half-step grid's."""
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    half = float((rtn_quantize(w, QuantSpec(3, True, 64))[0] - w).pow(2).mean())
    full = float((rtn_quantize(w, QuantSpec(3, True, 64, full_range=True))[0] - w).pow(2).mean())
    assert full < 0.85 * half
    with pytest.raises(ValueError, match="symmetric"):
        QuantSpec(4, False, 64, full_range=True)
    with pytest.raises(RecipeError, match="full_range needs symmetric: true"):
        parse_recipe({"steps": [{"method": "rtn_quantize", "symmetric": False, "full_range": True}]})
