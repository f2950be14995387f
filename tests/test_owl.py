"""OWL (outlier-weighted layerwise sparsity): the functions against brute-force loops, the engine's
per-block ratios against a textbook dense pass, and the sparsity each block really gets."""

import pytest
import torch

from conftest import tiny_llama
from slimkit.errors import RecipeError
from slimkit.models import adapter_for
from slimkit.pruning.owl import block_sparsities, outlier_ratio
from slimkit.recipes import RunResources, compress, parse_recipe


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(6, 5, generator=g), torch.rand(5, generator=g) * 4),
             (torch.randn(3, 7, generator=g) ** 3, torch.rand(7, generator=g))]
    scores = [abs(float(w[i, j])) * float(n[j]) for w, n in pairs for i in range(w.shape[0]) for j in range(w.shape[1])]
    mean = sum(scores) / len(scores)
    expected = sum(s > 2.0 * mean for s in scores) / len(scores)
    assert outlier_ratio(pairs, 2.0) == pytest.approx(expected)
    assert 0 < expected < 1


def test_block_sparsities_spread_by_outliers_and_keep_the_weighted_average():
    ratios, sizes = [0.01, 0.05, 0.03, 0.02], [100, 100, 300, 100]
    out = block_sparsities(ratios, sizes, 0.5, 0.08)
    assert sum(s * n for s, n in zip(out, sizes)) / sum(sizes) == pytest.approx(0.5, abs=1e-12)
    assert sorted(range(4), key=lambda i: out[i]) == sorted(range(4), key=lambda i: -ratios[i])  # more outliers, less pruned
    assert max(out) - min(out) == pytest.approx(0.16)
    raw = [0.58, 0.42, 0.50, 0.58 - 0.16 / 4]  # sparsity + shift - 2 shift (r - min) / (max - min)
    shifted = [r - sum(raw) / 4 + 0.5 for r in raw]  # then moved to the target average
    assert block_sparsities(ratios, [1] * 4, 0.5, 0.08) == pytest.approx(shifted)
    assert block_sparsities([0.02, 0.02], [1, 1], 0.5, 0.08) == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="leaves"):
        block_sparsities(ratios, sizes, 0.95, 0.08)


def _textbook_ratios(model, windows, threshold):
    """A dense forward with every block linear's inputs kept, Wanda scores pooled per block."""
    adapter = adapter_for(model)
    inputs, hooks = {}, []
    for name, module in adapter.linears(model).items():
        hooks.append(module.register_forward_pre_hook(
            lambda m, a, name=name: inputs.setdefault(name, []).append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        model(input_ids=windows)
    for h in hooks:
        h.remove()
    ratios = []
    for block in adapter.get_blocks(model):
        scores = []
        for module in adapter.block_linears(block).values():
            name = next(n for n, m in model.named_modules() if m is module)
            x = torch.cat(inputs[name]).double()
            scores.append((module.weight.double().abs() * x.pow(2).sum(0).sqrt()).flatten())
        s = torch.cat(scores)
        ratios.append(float((s > threshold * s.mean()).double().mean()))
    return ratios


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_owl_blocks_get_the_textbook_sparsities(method):
    model = tiny_llama(num_hidden_layers=4)
    windows = torch.randint(3, 96, (4, 32), generator=torch.Generator().manual_seed(0))
    ratios = _textbook_ratios(model, windows, 3.0)
    sizes = [sum(m.weight.numel() for m in adapter_for(model).block_linears(b).values())
             for b in adapter_for(model).get_blocks(model)]
    expected = block_sparsities(ratios, sizes, 0.5, 0.1)
    recipe = parse_recipe({"steps": [{"method": method, "sparsity": 0.5,
                                      "outlier_weighted": {"threshold": 3.0, "shift": 0.1}}]})
    result = compress(model, recipe, run=RunResources(calibration=lambda: windows))
    adapter = adapter_for(model)
    for i, block in enumerate(adapter.get_blocks(model)):
        for module in adapter.block_linears(block).values():
            pruned = float((module.weight == 0).float().mean())
            assert abs(pruned - expected[i]) <= 1.0 / module.weight.shape[1], (i, pruned, expected[i])
    notes = [n for r in result.records.values() for n in r.notes if n.startswith("OWL")]
    assert len(notes) == len(adapter.linears(model)) and len(set(notes)) > 1


def test_owl_refuses_a_pattern():
    with pytest.raises(RecipeError, match="an N:M pattern has one fixed density"):
        parse_recipe({"steps": [{"method": "wanda", "pattern": "2:4", "outlier_weighted": {}}]})


def test_owl_is_refused_by_streamed_runs_before_any_work():
    """OWL measures every block before pruning any, which a one-block-at-a-time run cannot do."""
    from slimkit.streaming.job import check_streamable

    recipe = parse_recipe({"name": "owl", "steps": [{"method": "sparsegpt", "sparsity": 0.5, "outlier_weighted": {}}]})
    with pytest.raises(RecipeError, match="outlier_weighted measures every block before pruning any"):
        check_streamable(recipe)
