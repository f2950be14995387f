"""Mask refinement by swaps against direct evaluation and a brute-force search over every mask."""

import itertools

import pytest
import torch

from conftest import tiny_llama
from slimkit.pruning.swap_refine import reconstruction_error, refine_mask
from slimkit.pruning.wanda import wanda_mask
from slimkit.recipes import RunResources, compress, parse_recipe


def _problem(seed, rows=4, cols=8):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / 2 + torch.eye(cols)
    x = torch.randn(200, cols, generator=g) @ mix  # correlated inputs: errors of pruned weights interact
    return w, x, 2 * x.T @ x / x.shape[0]


def _best_masks(w, hessian, kept_per_row):
    """The lowest reconstruction error of each row over all masks keeping `kept_per_row` weights."""
    cols = w.shape[1]
    best = []
    for r in range(w.shape[0]):
        errors = []
        for kept in itertools.combinations(range(cols), kept_per_row):
            keep = torch.zeros(1, cols, dtype=torch.bool)
            keep[0, list(kept)] = True
            errors.append(float(reconstruction_error(w[r:r + 1], keep, hessian)))
        best.append(min(errors))
    return torch.tensor(best)


def test_reconstruction_error_is_the_pruned_outputs_squared_error():
    w, x, hessian = _problem(0)
    keep = wanda_mask(w, x.norm(dim=0), 0.5)
    direct = 2 * ((x @ (w * ~keep).T) ** 2).sum(0) / x.shape[0]
    torch.testing.assert_close(reconstruction_error(w, keep, hessian), direct, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_refined_mask_lies_between_wanda_and_the_best_mask(seed):
    w, x, hessian = _problem(seed)
    keep = wanda_mask(w, x.norm(dim=0), 0.5)
    refined, report = refine_mask(w, keep, hessian, cycles=50)
    assert torch.equal(refined.sum(1), keep.sum(1))  # the same sparsity in every row
    before, after = reconstruction_error(w, keep, hessian), reconstruction_error(w, refined, hessian)
    assert (after <= before + 1e-5).all()
    assert (after >= _best_masks(w, hessian, 4) - 1e-4).all()
    assert report.error_after == pytest.approx(float(after.sum()), rel=1e-5)
    assert report.swaps > 0 and report.error_after < report.error_before


def test_one_cycle_takes_the_best_revive_then_the_best_prune():
    """Checked by direct evaluation: the revived weight is the pruned one whose return lowers the
    error most, the pruned one is then the kept one whose removal raises it least."""
    w, x, hessian = _problem(5, rows=6)
    keep = wanda_mask(w, x.norm(dim=0), 0.5)
    refined, _ = refine_mask(w, keep, hessian, cycles=1)
    for r in range(w.shape[0]):
        row, err = keep[r:r + 1], lambda m: float(reconstruction_error(w[r:r + 1], m, hessian))
        revived = {j: err(row | (torch.arange(8) == j)) for j in range(8) if not row[0, j]}
        j = min(revived, key=revived.get)
        after_j = row | (torch.arange(8) == j)
        pruned = {k: err(after_j & (torch.arange(8) != k)) for k in range(8) if row[0, k]}
        k = min(pruned, key=pruned.get)
        if pruned[k] < err(row) * (1 - 1e-6):
            assert refined[r, j] and not refined[r, k] and (refined[r] != keep[r]).sum() == 2, r
        else:
            assert torch.equal(refined[r], keep[r]), r


def test_swaps_keep_an_nm_pattern_and_an_earlier_mask():
    w, x, hessian = _problem(2, rows=8, cols=16)
    keep = wanda_mask(w, x.norm(dim=0), None, 2, 4)
    refined, report = refine_mask(w, keep, hessian, cycles=20, group=4)
    assert (refined.view(8, 4, 4).sum(-1) == 2).all()
    assert report.error_after < report.error_before
    earlier = torch.rand(8, 16, generator=torch.Generator().manual_seed(0)) > 0.3
    refined, _ = refine_mask(w, keep & earlier, hessian, cycles=20, revivable=earlier)
    assert not (refined & ~earlier).any()  # what an earlier step pruned never comes back


def _windows(n=8, seqlen=32, vocab=96):
    return torch.randint(3, vocab, (n, seqlen), generator=torch.Generator().manual_seed(0))


def test_wanda_with_swaps_lowers_the_model_error_of_wanda():
    windows = _windows()
    reference = tiny_llama()(windows).logits.detach()
    errors = {}
    for swaps in (0, 32):
        model = tiny_llama()
        recipe = parse_recipe({"steps": [{"method": "wanda", "sparsity": 0.6, "swaps": swaps}]})
        result = compress(model, recipe, run=RunResources(calibration=lambda: windows))
        errors[swaps] = float((model(windows).logits.detach() - reference).pow(2).mean())
        for name, record in result.records.items():
            assert float((~record.mask).float().mean()) == pytest.approx(0.6, abs=0.02), name
    assert errors[32] < errors[0]
    assert all("swaps:" in r.notes[-1] and r.methods == ["Wanda 60% +swaps 32"] for r in result.records.values())


@pytest.mark.real_model
def test_swaps_lower_wanda_reconstruction_error_on_smollm2(smollm2):
    from slimkit.data import calibration_windows
    from slimkit.data.corpus import load_split

    model, tok = smollm2.model, smollm2.tokenizer
    ids = calibration_windows(tok, load_split(), 8, 64)
    recipe = parse_recipe({"steps": [{"method": "wanda", "sparsity": 0.5, "swaps": 16,
                                      "ignore": ["model.layers.[1-9]*"]}]})
    result = compress(model, recipe, run=RunResources(calibration=lambda: ids))
    ratios = [float(r.notes[-1].split("x")[-1]) for r in result.records.values() if r.mask is not None]
    assert len(ratios) == 7 and max(ratios) < 1.0, ratios
