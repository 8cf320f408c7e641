"""The tile layout of the scoped-attention kernels, built on the host (no CuPy here).

The attention kernels (agpt/gpu/kernels.py) cut a unit's rows, in depth-first preorder, into
tiles of `tile` consecutive rows. Per tile they need the ancestors of its first row, and the
backward needs the "boundary" rows: the strict ancestors of some tile's first row, whose K/V
gradient is summed over several tiles. One pass over the rows gives both, and checks that the
rows are a forest in preorder: in preorder a row's ancestors are the latest rows of each
smaller depth, so a stack of "latest row per depth" holds the ancestors of the row at hand.

It runs where the unit is prepared (a worker process, or a loader thread without the GIL), so
uploading a unit is only copies. The reference for the check and the ancestors is
agpt.model.layout.tree_layout (tests/test_tiles.py); the kernels' tests use this layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit


@dataclass
class TileLayout:
    """Rows cut into tiles of `tile` consecutive rows, one attention block per (tile, head).
    The arrays are NumPy on the host, CuPy once uploaded."""

    tile: int
    anc: Any        # (n_tiles, max_depth) int32: ancestors of each tile's first row, -1 padded
    bidx: Any       # (N,) int32: index of a boundary row (K/V gradient over tiles), else -1
    brow: Any       # (B,) int32: the boundary rows (strict ancestors of tile-first rows), -1 pad
    max_depth: int

    def arrays(self) -> list[Any]:
        return [self.anc, self.bidx, self.brow]


def default_tile(max_depth: int) -> int:
    """Tile rows: 128 (measured best at depth 32) while shared memory allows."""
    if max_depth > 256:
        raise ValueError(f"the tiled attention kernels take contexts up to 256, not {max_depth}")
    return 128 if max_depth <= 64 else 64


def boundary_capacity(n: int, max_depth: int, tile: int | None = None) -> int:
    """The most boundary rows n rows can have: each tile-first row has < max_depth ancestors."""
    tile = tile or default_tile(max_depth)
    return min(n, (n + tile - 1) // tile * (max_depth - 1))


@njit(nogil=True, cache=True)
def _tile_pass(parent, depth, dm, tile, anc, bidx, brow):     # pragma: no cover - compiled
    """Fill anc, bidx and brow (sized to boundary_capacity; the rest -1). Returns (the first
    row that breaks "forest in depth-first preorder, depths 1..dm" or -1, boundary rows)."""
    n = depth.shape[0]
    last = np.full(dm + 1, -1, np.int64)       # last[d]: the latest row of depth d so far
    prev = 0
    for i in range(n):
        bidx[i] = -1
    for i in range(n):
        d = depth[i]
        # a depth grows by at most one from the row before (the first row is a root), and the
        # parent is the latest row one level up: exactly the rows of a preorder forest
        if d < 1 or d > dm or d > prev + 1:
            return i, 0
        if d == 1:
            if parent[i] != -1:
                return i, 0
        elif parent[i] != last[d - 1]:
            return i, 0
        last[d] = i
        prev = d
        if i % tile == 0:
            t = i // tile
            for j in range(d - 1):
                anc[t, j] = last[j + 1]
                bidx[last[j + 1]] = 0              # a boundary row; numbered below
            for j in range(d - 1, dm):
                anc[t, j] = -1
    nb = 0
    for i in range(n):
        if bidx[i] == 0:
            bidx[i] = nb
            brow[nb] = i
            nb += 1
    for b in range(nb, brow.shape[0]):
        brow[b] = -1
    return -1, nb


def host_tiles(parent: np.ndarray, depth: np.ndarray, max_depth: int | None = None,
               tile: int | None = None, fixed: bool = False) -> TileLayout:
    """The tile layout of rows in depth-first preorder (parent -1 at depth 1), for contexts up
    to `max_depth` (at least the deepest row's); ValueError if the rows are not such a forest.
    With `fixed`, the boundary rows are padded with -1 to `boundary_capacity`, so every array's
    shape depends on (rows, max_depth) alone: what a CUDA graph replayed over units needs."""
    n = len(depth)
    max_depth = max(int(depth.max()) if n else 1, max_depth or 1)
    tile = tile or default_tile(max_depth)
    anc = np.empty(((n + tile - 1) // tile, max_depth), np.int32)
    bidx = np.empty(n, np.int32)
    brow = np.empty(boundary_capacity(n, max_depth, tile), np.int32)
    bad, nb = _tile_pass(np.asarray(parent, np.int32), np.asarray(depth, np.int32),
                         max_depth, tile, anc, bidx, brow)
    if bad >= 0:
        raise ValueError(f"rows are not a forest in depth-first preorder (row {bad})")
    return TileLayout(tile, anc, bidx, brow if fixed else brow[:nb], max_depth)


__all__ = ["TileLayout", "default_tile", "boundary_capacity", "host_tiles"]
