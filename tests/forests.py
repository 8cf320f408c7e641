"""Forests of rows in depth-first preorder (parent, depth), for the layout and kernel tests."""

from __future__ import annotations

import numpy as np


def random_forest(rng: np.random.Generator, n: int, dm: int, wide: bool = False):
    """(parent, depth) of n rows in depth-first preorder, depth <= dm. `wide`: one root whose
    subtree holds every row, so its K/V gradient sums contributions from thousands of warps."""
    depth = np.empty(n, np.int64)
    parent = np.empty(n, np.int64)
    stack: list[int] = []
    for i in range(n):
        top = len(stack) + 1
        lo = 2 if wide and i else 1
        d = int(rng.integers(lo, min(top, dm) + 1)) if i else 1
        if rng.random() < 0.6 and top <= dm:
            d = max(d, min(top, dm))          # favour long chains, as in a radix trie
        del stack[d - 1:]
        parent[i] = stack[-1] if stack else -1
        depth[i] = d
        stack.append(i)
    return parent, depth


def shaped_forest(kind: str, n: int, dm: int):
    """(parent, depth) of regular forests that stress the tiled kernels: `chains` (a new
    root every dm rows, each the top of a chain dm deep), `broom` (one root shared by every
    row, under it chains of depth 2..dm), `star` (one root, every other row its child),
    `flat` (n roots)."""
    i = np.arange(n)
    if kind == "chains":
        depth = i % dm + 1
    elif kind == "broom":
        depth = np.where(i == 0, 1, (i - 1) % (dm - 1) + 2)
    elif kind == "star":
        depth = np.where(i == 0, 1, 2)
    else:
        depth = np.ones(n, np.int64)
    parent = np.where(depth == 1, -1, np.where((kind == "broom") & (depth == 2) | (kind == "star"),
                                                0, i - 1))
    return parent, depth


def forest(kind: str, n: int, dm: int, rng: np.random.Generator):
    """(parent, depth) of a forest of `kind`: `random` or `wide` (random_forest, drawn from
    rng), else one of shaped_forest's."""
    if kind in ("random", "wide"):
        return random_forest(rng, n, dm, kind == "wide")
    return shaped_forest(kind, n, dm)
