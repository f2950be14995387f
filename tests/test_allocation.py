"""The budget allocator against brute force (every combination of choices) on small problems, and
the gain curve that turns proxy errors into predicted KLD."""

import itertools
import random

import pytest
import torch

from slimkit.errors import SlimkitError
from slimkit.quantization.allocation import Choice, Item, best_under, smallest_within


def _items(seed: int, n: int = 5) -> list[Item]:
    rng = random.Random(seed)
    items = []
    for i in range(n):
        size = rng.randint(1_000, 50_000)
        gain = rng.uniform(0.1, 10)
        choices = tuple(Choice(t, int(size * bits / 8), gain * 2.0 ** -bits) for t, bits in
                        (("Q2_K", 2.625), ("Q3_K", 3.4375), ("Q4_K", 4.5), ("Q6_K", 6.5625), ("Q8_0", 8.5)))
        items.append(Item(f"t{i}", (f"t{i}", f"t{i}.tied") if i == 0 else (f"t{i}",), choices))
    return items


def _every(items):
    for picks in itertools.product(*(item.choices for item in items)):
        yield sum(c.bytes for c in picks), sum(c.kld for c in picks), picks


@pytest.mark.parametrize("seed", range(6))
def test_best_under_a_budget_is_the_brute_force_optimum(seed):
    items = _items(seed)
    every = list(_every(items))
    low, high = min(b for b, _, _ in every), max(b for b, _, _ in every)
    for budget in (low, (low + high) // 3, (low + high) // 2, high):
        found = best_under(items, budget)
        optimum = min(k for b, k, _ in every if b <= budget)
        assert found.bytes <= budget
        assert found.predicted_kld <= optimum * (1 + 1e-9) + 1e-12, (budget, found.predicted_kld, optimum)
        assert found.types["t0"] == found.types["t0.tied"]  # members share the item's type


def _born_on_q4(items: list[Item]) -> list[Item]:
    """The items with one more choice, Q4_1, smaller than Q6_K and at zero KLD (weights born on its
    grid, like SmolLM2's): the least KLD sits far below the largest budgets."""
    return [Item(i.name, i.members, i.choices + (Choice("Q4_1", i.choices[2].bytes + 1, 0.0),)) for i in items]


@pytest.mark.parametrize("seed", range(4))
def test_a_floor_fills_the_budget_with_the_least_kld_between_floor_and_budget(seed):
    items = _born_on_q4(_items(seed))
    every = list(_every(items))
    high = max(b for b, _, _ in every)
    unfilled = best_under(items, high)
    assert unfilled.predicted_kld == 0.0 and unfilled.bytes < 0.8 * high  # nothing asks for more bytes
    for budget in (high, int(0.9 * high), int(0.8 * high)):
        floor = int(0.99 * budget)
        found = best_under(items, budget, floor=floor)
        window = [k for b, k, _ in every if floor <= b <= budget]
        assert floor <= found.bytes <= budget, (budget, found.bytes)
        assert found.predicted_kld <= min(window) * (1 + 1e-9) + 1e-12


def test_a_floor_no_total_reaches_falls_back_to_the_least_kld_under_the_budget():
    items = _items(3)
    largest = sum(max(c.bytes for c in i.choices) for i in items)
    found = best_under(items, 2 * largest, floor=int(1.9 * largest))  # more than every type's largest
    assert found.bytes == largest and found.predicted_kld == best_under(items, 2 * largest).predicted_kld


@pytest.mark.parametrize("seed", range(4))
def test_smallest_within_a_kld_bound_is_the_brute_force_optimum(seed):
    items = _items(seed)
    every = list(_every(items))
    bound = sorted(k for _, k, _ in every)[len(every) // 2]
    found = smallest_within(items, bound)
    assert found.predicted_kld <= bound
    assert found.bytes == min(b for b, k, _ in every if k <= bound)


def test_impossible_budgets_are_clear_errors():
    items = _items(0)
    with pytest.raises(SlimkitError, match="below the smallest file"):
        best_under(items, 10)
    with pytest.raises(SlimkitError, match="no choice of these types predicts a KLD within"):
        smallest_within(items, 0.0)


def test_coarse_byte_units_never_exceed_the_budget_and_lose_at_most_a_unit_per_item():
    """Big files: the programme counts bytes in units (rounded); the exact total still fits the
    budget, and the answer is no worse than the optimum of a budget smaller by a unit per item."""
    items = [Item(i.name, i.members, tuple(Choice(c.qtype, c.bytes * 10_000, c.kld) for c in i.choices))
             for i in _items(7)]
    every = list(_every(items))
    from slimkit.quantization.allocation import Frontier

    unit = Frontier(items).unit
    assert unit > 1
    budget = (min(b for b, _, _ in every) + max(b for b, _, _ in every)) // 2
    found = best_under(items, budget)
    assert found.bytes <= budget
    assert found.predicted_kld <= min(k for b, k, _ in every if b <= budget - len(items) * unit) + 1e-12


def test_a_gain_curve_returns_its_measured_points_and_interpolates_in_log_proxy():
    import math

    from slimkit.quantization.sensitivity import GainCurve

    curve = GainCurve(((10.0, 4e-4), (1000.0, 1e-4)))  # the fine type's gain is the larger one
    assert curve.kld(10.0) == pytest.approx(4e-3) and curve.kld(1000.0) == pytest.approx(0.1)
    assert curve.kld(100.0) == pytest.approx(2.5e-4 * 100)  # halfway in log proxy: the mean gain
    assert curve.kld(1.0) == pytest.approx(4e-4) and curve.kld(1e5) == pytest.approx(10.0)  # constant beyond
    assert curve.kld(0.0) == 0.0 and GainCurve(()).kld(5.0) == 0.0
    klds = [curve.kld(x) for x in (10 * math.exp(0.5 * i) for i in range(11))]
    assert all(a < b for a, b in zip(klds, klds[1:]))


def test_measure_gain_predicts_the_probes_kld_at_the_types_it_measured():
    """The gain is measured with the grids the proxies are computed on (importance included)."""
    from conftest import tiny_llama
    from slimkit.quantization.sensitivity import KLDProbe, measure_gain, proxy_errors, rounded

    torch.manual_seed(0)
    model = tiny_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=2).eval()
    probe = KLDProbe(model, torch.randint(0, model.config.vocab_size, (2, 32)))
    weight = model.model.layers[1].mlp.up_proj.weight
    x = torch.randn(256, 64) * torch.linspace(0.2, 3.0, 64)
    hessian = x.T @ x
    errors = proxy_errors(weight, hessian, ["Q4_0", "Q5_0", "Q8_0"])
    curve = measure_gain(probe, weight, errors, torch.diagonal(hessian))
    for qtype in ("Q4_0", "Q8_0"):
        measured = probe.kld_with(weight, rounded(weight, qtype, torch.diagonal(hessian)))
        assert curve.kld(errors[qtype]) == pytest.approx(measured, rel=1e-9)
    assert curve.kld(errors["Q8_0"]) < curve.kld(errors["Q5_0"]) < curve.kld(errors["Q4_0"])


@pytest.mark.parametrize("seed", range(4))
def test_best_within_a_time_budget_is_the_brute_force_optimum(seed):
    """Costs of either sign (a type measured faster than the reference), on the resolution's grid."""
    from slimkit.quantization.allocation import best_within

    items = _items(seed, n=4)
    rng = random.Random(seed)
    cost = {i.name: {c.qtype: rng.randint(-30, 60) * 1e-4 for c in i.choices} for i in items}
    every = [(sum(cost[i.name][c.qtype] for i, c in zip(items, picks)), k) for _, k, picks in _every(items)]
    low, high = min(t for t, _ in every), max(t for t, _ in every)
    for budget in (low, (2 * low + high) / 3, (low + high) / 2, high):
        found = best_within(items, cost, budget + 1e-12)
        assert sum(cost[n][c.qtype] for n, c in found.chosen.items()) <= budget + 1e-9
        assert found.predicted_kld == pytest.approx(min(k for t, k in every if t <= budget + 1e-9), rel=1e-9)
    with pytest.raises(SlimkitError, match="below the cheapest"):
        best_within(items, cost, low - 1e-3)
