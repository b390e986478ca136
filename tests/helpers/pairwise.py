"""Test-only: a small greedy all-pairs (pairwise) design, deterministic, no dependency.

all_pairs(factors, skip, cost) -> list of cells (dicts factor -> level) such that every pair of levels of
every two factors appears in some cell, except the factor pairs listed in ``skip``. Greedy: each new cell is,
of all the full combinations, the one covering the most pairs not yet covered, minus ``cost(cell)`` (so
that expensive levels, e.g. a 2-process DDP run, are used only where they buy pairs); ties go to the
first in product order."""
from __future__ import annotations

import itertools
from collections.abc import Callable


def required_pairs(factors: dict[str, list], skip: set[frozenset[str]] = frozenset()) -> set[tuple]:
    names = list(factors)
    return {((a, va), (b, vb)) for a, b in itertools.combinations(names, 2) if frozenset((a, b)) not in skip
            for va in factors[a] for vb in factors[b]}


def pairs_of(cell: dict, skip: set[frozenset[str]] = frozenset()) -> set[tuple]:
    names = list(cell)
    return {((a, cell[a]), (b, cell[b])) for a, b in itertools.combinations(names, 2)
            if frozenset((a, b)) not in skip}


def all_pairs(factors: dict[str, list], skip: set[frozenset[str]] = frozenset(),
              cost: Callable[[dict], float] = lambda cell: 0.0) -> list[dict]:
    todo = required_pairs(factors, skip)
    candidates = [dict(zip(factors, values)) for values in itertools.product(*factors.values())]
    cells = []
    while todo:
        best = max(candidates, key=lambda c: (len(pairs_of(c, skip) & todo) > 0,
                                              len(pairs_of(c, skip) & todo) - cost(c)))
        cells.append(best)
        todo -= pairs_of(best, skip)
    return cells
