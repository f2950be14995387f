import pytest
import torch

from conftest import tiny_llama
from slimkit.errors import ShapeError
from slimkit.numerics.magnitude import global_threshold, nm_mask, threshold_mask, unstructured_mask
from slimkit.recipes import compress, parse_recipe


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (5, 8), (2, 16)])
def test_nm_mask_has_exactly_n_per_group(n, m):
    w = torch.randn(24, 64)
    mask = nm_mask(w, n, m)
    assert (mask.view(24, -1, m).sum(-1) == n).all()
    # the kept ones are the largest in their group
    groups, keep = w.abs().view(24, -1, m), mask.view(24, -1, m)
    assert (groups[keep].view(24, -1, n).min(-1).values >= groups[~keep].view(24, -1, m - n).max(-1).values).all()


def test_nm_mask_with_ties_still_exact():
    w = torch.ones(4, 16)  # every score ties
    assert (nm_mask(w, 2, 4).view(4, -1, 4).sum(-1) == 2).all()


def test_nm_indivisible_is_a_clear_error():
    with pytest.raises(ShapeError, match="not divisible by M=4"):
        nm_mask(torch.randn(8, 30), 2, 4)


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
def test_unstructured_mask_exact(sparsity):
    w = torch.randn(33, 77)
    mask = unstructured_mask(w, sparsity)
    assert (~mask).sum() == round(sparsity * w.numel())
    assert w.abs()[mask].min() >= w.abs()[~mask].max()


def test_global_threshold_spreads_sparsity_by_magnitude():
    small, large = torch.randn(64, 64) * 0.01, torch.randn(64, 64)
    thr = global_threshold([small, large], 0.5)
    s_small = 1 - threshold_mask(small, thr).float().mean()
    s_large = 1 - threshold_mask(large, thr).float().mean()
    assert s_small > 0.9 and s_large < 0.1
    overall = (s_small + s_large) / 2
    assert abs(overall - 0.5) < 0.01


def _zero_frac(t):
    return float((t == 0).float().mean())


def test_compress_nm_excludes_lm_head_by_default():
    model = tiny_llama()
    emb_before = model.model.embed_tokens.weight.clone()
    result = compress(model, parse_recipe({"steps": [{"method": "magnitude_prune", "pattern": "2:4"}]}))
    assert len(result.records) == 2 * 7
    for name, rec in result.records.items():
        w = model.get_submodule(name).weight
        assert (w.view(w.shape[0], -1, 4) != 0).sum(-1).le(2).all(), name
        assert rec.mask is not None and rec.methods == ["magnitude 2:4"]
    assert torch.equal(model.model.embed_tokens.weight, emb_before)


def test_compress_include_lm_head_and_ignore():
    model = tiny_llama(tie_word_embeddings=False)
    recipe = parse_recipe({"steps": [{"method": "magnitude_prune", "sparsity": 0.5, "include_lm_head": True,
                                      "ignore": ["*.mlp.*"]}]})
    result = compress(model, recipe)
    assert "lm_head" in result.records
    assert not any(".mlp." in n for n in result.records)
    assert abs(_zero_frac(model.lm_head.weight) - 0.5) < 0.01
    assert _zero_frac(model.model.layers[0].mlp.up_proj.weight) == 0


def test_global_scope_reaches_target_overall():
    model = tiny_llama()
    result = compress(model, parse_recipe({"steps": [{"method": "magnitude_prune", "sparsity": 0.6, "scope": "global"}]}))
    zeros = sum(int((model.get_submodule(n).weight == 0).sum()) for n in result.records)
    total = sum(model.get_submodule(n).weight.numel() for n in result.records)
    assert abs(zeros / total - 0.6) < 0.001


def test_nm_on_indivisible_layer_fails_before_any_change():
    model = tiny_llama(hidden_size=60, intermediate_size=120, num_attention_heads=3, num_key_value_heads=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ShapeError, match="not divisible by M=8"):
        compress(model, parse_recipe({"steps": [{"method": "magnitude_prune", "pattern": "2:8"}]}))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("k", [0, 1, 7, 500, 999, 1000])
def test_smallest_k_mask_is_exact_with_ties(k):
    from slimkit.numerics.magnitude import smallest_k_mask

    g = torch.Generator().manual_seed(0)
    scores = torch.rand(1000, generator=g) ** 3 * 50  # spans several exponents, values above 2
    scores[::10] = scores[5]  # many exact ties
    scores[::17] = 0.0
    mask = smallest_k_mask(scores.view(20, 50), k).flatten()
    assert int(mask.sum()) == k
    if 0 < k < 1000:
        assert scores[mask].max() <= scores[~mask].min()
    with pytest.raises(ValueError):
        smallest_k_mask(torch.tensor([1.0, -1.0]), 1)
