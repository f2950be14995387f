"""Bits allocated tensor by tensor to a budget: a multiple-choice knapsack solved exactly by
dynamic programming over bytes.

Each item (a tensor, or tensors that must share one type: a tied pair, one projection of a
block's experts) has a few choices, a GGML type each with its bytes and its predicted KLD
contribution (`quantization/sensitivity.py`). The predicted KLD of the model is the sum over
items. `best_under` picks one choice per item minimising the sum within a byte budget (and, given
a floor, at no fewer bytes than it: a target size is filled, not only respected);
`smallest_within` the fewest bytes whose predicted KLD stays within a bound. Bytes are counted in
units (at most MAX_UNITS of them over the largest file) rounded to nearest, and the exact byte
total is checked against the budget afterwards: the answer never exceeds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from slimkit.errors import SlimkitError

MAX_UNITS = 200_000  # states of the dynamic programme (the byte resolution is the largest file / this)


@dataclass(frozen=True)
class Choice:
    qtype: str
    bytes: int
    kld: float  # predicted contribution to the model's mean KLD


@dataclass(frozen=True)
class Item:
    name: str  # what the allocation is reported under
    members: tuple[str, ...]  # the tensors that take the chosen type together
    choices: tuple[Choice, ...]


@dataclass(frozen=True)
class Allocation:
    types: dict[str, str]  # every member tensor -> its GGML type
    bytes: int
    predicted_kld: float
    chosen: dict[str, Choice]  # item name -> its choice


def _check(items: list[Item]) -> None:
    for item in items:
        if not item.choices:
            raise SlimkitError(f"allocation: {item.name} has no type that tiles its rows")


def _allocation(items: list[Item], picks: list[int]) -> Allocation:
    chosen = {item.name: item.choices[p] for item, p in zip(items, picks)}
    types = {m: chosen[item.name].qtype for item in items for m in item.members}
    return Allocation(types, sum(c.bytes for c in chosen.values()), sum(c.kld for c in chosen.values()), chosen)


class Frontier:
    """The dynamic programme over bytes: for every total of exactly b units, the least predicted
    KLD and the choices that reach it (`best`: the least within b units)."""

    def __init__(self, items: list[Item]):
        _check(items)
        self.items = items
        most = sum(max(c.bytes for c in item.choices) for item in items)
        self.unit = max(1, -(-most // MAX_UNITS))
        self.capacity = -(-most // self.unit)
        exact = np.full(self.capacity + 1, np.inf)
        exact[0] = 0.0
        self.picks = np.zeros((len(items), self.capacity + 1), dtype=np.int8)  # choices per item < 128
        for i, item in enumerate(items):
            exact = self._add(exact, item, self.picks[i])
        self.exact = exact  # exact[b]: least KLD at exactly b units (inf where no choice sums to b)
        self.best = np.minimum.accumulate(exact)  # best[b]: least KLD within b units

    def _add(self, best: np.ndarray, item: Item, picks: np.ndarray) -> np.ndarray:
        new = np.full_like(best, np.inf)
        for k, choice in enumerate(item.choices):
            units = int(round(choice.bytes / self.unit))
            shifted = np.full_like(best, np.inf)
            shifted[units:] = best[: len(best) - units] + choice.kld
            better = shifted < new
            new[better], picks[better] = shifted[better], k
        return new

    def at(self, units: int, floor: int = 0) -> Allocation:
        """The least predicted KLD at no more than `units` and, where some total between them is
        reachable, no fewer than `floor` (else the least within `units`)."""
        units = min(units, self.capacity)
        if units < 0 or not np.isfinite(self.best[units]):
            raise SlimkitError("allocation: the budget is below the smallest file these types can make "
                               f"({self.smallest_bytes() / 1e6:.2f} MB of tensors)")
        low = min(max(floor, 0), units)
        window = self.exact[low: units + 1]
        start = low if np.isfinite(window).any() else 0
        return self._traced(start + int(np.argmin(self.exact[start: units + 1])))

    def _traced(self, units: int) -> Allocation:
        picks = []
        for i in range(len(self.items) - 1, -1, -1):
            k = int(self.picks[i, units])
            picks.append(k)
            units -= int(round(self.items[i].choices[k].bytes / self.unit))
        return _allocation(self.items, picks[::-1])

    def smallest_bytes(self) -> int:
        return sum(min(c.bytes for c in item.choices) for item in self.items)

    def curve(self, points: int = 48) -> list[tuple[int, float]]:
        """(bytes, least predicted KLD) at `points` budgets from the smallest file to the largest
        (bytes to the unit)."""
        low = -(-self.smallest_bytes() // self.unit)
        units = np.unique(np.linspace(low, self.capacity, points).round().astype(int))
        return [(int(u) * self.unit, float(self.best[u])) for u in units if np.isfinite(self.best[u])]


def best_under(items: list[Item], budget: int, floor: int = 0) -> Allocation:
    """The least predicted KLD whose tensors take at most `budget` bytes and at least `floor` where
    the types can make such a total (a target is filled: where the least KLD sits in fewer bytes,
    say when a model's weights were born on one type's grid, more bits are spent rather than bytes
    left unused)."""
    frontier = Frontier(items)
    units = min(budget // frontier.unit, frontier.capacity)
    while True:  # units are rounded: step down until the exact byte total fits
        allocation = frontier.at(units, -(-floor // frontier.unit))
        if allocation.bytes <= budget:
            return allocation
        units -= max(1, (allocation.bytes - budget) // frontier.unit)


def smallest_within(items: list[Item], max_kld: float) -> Allocation:
    """The fewest bytes whose predicted KLD is at most `max_kld`."""
    frontier = Frontier(items)
    fits = np.nonzero(frontier.exact <= max_kld)[0]
    if len(fits) == 0:
        least = float(frontier.best[-1])
        raise SlimkitError(f"allocation: no choice of these types predicts a KLD within {max_kld:g} "
                           f"(the least is {least:.4g}, every tensor at its largest type)")
    return frontier._traced(int(fits[0]))


def best_within(items: list[Item], cost: dict[str, dict[str, float]], budget: float,
                resolution: float = 1e-4) -> Allocation:
    """The least predicted KLD whose summed `cost` (item name -> type -> cost, any sign: a measured
    time) is at most `budget`: the same programme with each item's cost above its cheapest counted
    in whole steps of `resolution`, rounded up (the answer never exceeds the budget; it is optimal
    to within one step per item)."""
    floor = {item.name: min(cost[item.name][c.qtype] for c in item.choices) for item in items}
    left = budget - sum(floor.values())
    if left < 0:
        raise SlimkitError(f"allocation: the budget, {budget:.4g}, is below the cheapest choice of these types "
                           f"({sum(floor.values()):.4g})")
    steps = [Item(item.name, item.members, tuple(Choice(c.qtype, math.ceil((cost[item.name][c.qtype] - floor[item.name])
                                                                             / resolution - 1e-9), c.kld)
                                                  for c in item.choices)) for item in items]
    chosen = best_under(steps, int(left / resolution)).chosen
    return _allocation(items, [next(k for k, c in enumerate(item.choices) if c.qtype == chosen[item.name].qtype)
                               for item in items])
