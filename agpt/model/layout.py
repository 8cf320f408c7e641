"""Which rows a row attends to: a trie in depth-first order, or a batch of windows.

The model computes every row (one context position) once per layer, all rows batched; the
layout is the only thing that differs between trie training and window training.

- `TreeLayout`: rows of a trie unit in depth-first preorder, each attending to its ancestors
  and itself (exactly its context). In preorder every subtree is a contiguous range, so for a
  fixed depth j the depth-j ancestors of consecutive rows form contiguous runs: the K/V
  gradient an ancestor receives from all its descendants is a segmented sum over one run
  (`aggregate`), no scatter and no atomics.
- `ParentTree`: the same rows as parent pointers only, plus the GPU attention kernels' tiles
  (they walk ancestors in shared memory instead of gathering an (N, Dm) ancestor matrix;
  agpt/gpu/kernels.py).
- `WindowLayout`: B windows of T rows, dense causal attention (the window baseline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class TreeLayout:
    depth: np.ndarray      # (N,) int32, 1-based context length of each row
    anc: np.ndarray        # (N, Dm) int32: anc[i, j] = row of i's ancestor at depth j+1 (padded)
    level: list[np.ndarray]  # level[j]: the rows at depth j+1, ascending (subtree starts)
    first: list[int]       # first[j] = level[j][0] (host ints: no device sync to slice), or -1

    @property
    def n_rows(self) -> int:
        return len(self.depth)

    @property
    def max_depth(self) -> int:
        return self.anc.shape[1]

    def arrays(self) -> list[Any]:
        """Its arrays (what a staged unit holds)."""
        return [self.depth, self.anc, *self.level]

    @property
    def pos(self) -> np.ndarray:
        return self.depth - 1

    @property
    def max_pos(self) -> int:
        return self.max_depth - 1


@dataclass
class ParentTree:
    """Rows in depth-first preorder as device arrays: parent (-1 at depth 1) and depth, int32."""

    parent: Any
    depth: Any
    max_depth: int         # host int (no device sync to size tables)
    tiles: Any = None      # agpt.gpu.kernels.TileLayout, made once per staged unit

    @property
    def n_rows(self) -> int:
        return len(self.depth)

    def arrays(self) -> list[Any]:
        """Its device arrays, in a fixed order (a graph's inputs are copied over in it)."""
        return [self.parent, self.depth, *(self.tiles.arrays() if self.tiles is not None else [])]

    @property
    def pos(self) -> Any:
        return self.depth - 1

    @property
    def max_pos(self) -> int:
        return self.max_depth - 1


def tree_layout(parent: np.ndarray, depth: np.ndarray, max_depth: int | None = None) -> TreeLayout:
    """Layout of rows in depth-first preorder; parent[i] < i is a row index or -1 (depth 1).
    `max_depth` (at least the deepest row's) widens the ancestor table."""
    parent = np.asarray(parent, dtype=np.int64)
    depth = np.asarray(depth, dtype=np.int32)
    n = len(depth)
    dm = max(int(depth.max()) if n else 1, max_depth or 1)
    if n and (np.any(parent >= np.arange(n)) or np.any((parent < 0) != (depth == 1))
              or np.any(depth[parent[parent >= 0]] != depth[parent >= 0] - 1)):
        raise ValueError("rows are not a forest in preorder (parent before child, depth+1)")
    anc = np.repeat(np.arange(n, dtype=np.int32)[:, None], dm, axis=1)
    for d in range(2, dm + 1):
        r = np.flatnonzero(depth == d)
        anc[r, : d - 1] = anc[parent[r], : d - 1]
    level = [np.flatnonzero(depth == d) for d in range(1, dm + 1)]
    idx = np.arange(n)
    for j in range(dm - 1):   # preorder <=> each row's depth-(j+1) ancestor is the last one before it
        last = np.maximum.accumulate(np.where(depth == j + 1, idx, -1))
        deep = depth > j + 1
        if np.any(anc[deep, j] != last[deep]):
            raise ValueError("rows are not in depth-first preorder (a subtree is not contiguous)")
    return TreeLayout(depth, anc, level, [int(x[0]) if len(x) else -1 for x in level])


@dataclass
class WindowLayout:
    """B windows of T rows each, row b*T + t at position t; causal attention inside a window."""

    batch: int
    length: int

    @property
    def n_rows(self) -> int:
        return self.batch * self.length

    @property
    def pos(self) -> np.ndarray:
        return np.tile(np.arange(self.length, dtype=np.int32), self.batch)

    @property
    def max_pos(self) -> int:
        return self.length - 1


Layout = TreeLayout | ParentTree | WindowLayout
