"""The budget allocator against brute force (every combination of choices) on small problems."""

import itertools
import random

import pytest

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
