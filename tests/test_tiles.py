"""The host tile layout of the attention kernels (agpt/gpu/tiles.py) against the NumPy layout
(agpt.model.layout.tree_layout): the same ancestors, the same boundary rows, and the same
verdict on rows that are not a forest in depth-first preorder."""

from __future__ import annotations

import numpy as np
import pytest
from forests import forest, random_forest

from agpt.gpu.tiles import boundary_capacity, default_tile, host_tiles
from agpt.model.layout import tree_layout

FORESTS = [("random", 1, 1), ("random", 37, 4), ("random", 3000, 8), ("wide", 5000, 16),
           ("wide", 2000, 32), ("chains", 1000, 32), ("chains", 256, 32), ("broom", 5003, 32),
           ("broom", 100, 32), ("star", 777, 2), ("flat", 300, 1), ("random", 700, 100)]


def _accepts(fn, *args) -> bool:
    try:
        fn(*args)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("shape", FORESTS, ids=lambda f: "-".join(map(str, f)))
@pytest.mark.parametrize("tile", [None, 32, 64])
@pytest.mark.parametrize("fixed", [False, True])
def test_host_tiles_match_the_numpy_layout(shape, tile, fixed) -> None:
    kind, n, dm = shape
    parent, depth = forest(kind, n, dm, np.random.default_rng(n + dm))
    n, dm = len(depth), max(int(depth.max()), 1) + 1        # one level of slack, as padding has
    ref = tree_layout(parent, depth, dm)                     # anc[r, j]: r's depth-(j+1) ancestor
    got = host_tiles(parent, depth, dm, tile, fixed)
    tile = tile or default_tile(dm)
    assert got.tile == tile and got.max_depth == dm
    firsts = np.arange(0, n, tile)
    want = np.where(np.arange(dm)[None, :] < depth[firsts, None] - 1, ref.anc[firsts], -1)
    np.testing.assert_array_equal(got.anc, want)
    brow = np.unique(want[want >= 0])
    bidx = np.full(n, -1)
    bidx[brow] = np.arange(len(brow))
    np.testing.assert_array_equal(got.bidx, bidx)
    cap = boundary_capacity(n, dm, tile)
    assert len(brow) <= cap
    np.testing.assert_array_equal(got.brow, np.concatenate([brow, np.full(cap - len(brow), -1)])
                                  if fixed else brow)
    assert all(a.dtype == np.int32 for a in got.arrays())


def test_host_tiles_refuse_rows_not_in_preorder() -> None:
    # A(1) B(1) C(2, child of A): A's subtree is not contiguous; a depth jump; a root with a
    # parent; a parent after its child; a non-root first row; depth 0
    for par, dep in [([-1, -1, 0], [1, 1, 2]), ([-1, 0, 0], [1, 2, 3]), ([0], [1]),
                     ([-1, 1], [1, 2]), ([-1, 2, -1], [1, 2, 1]), ([0, -1], [2, 1]),
                     ([-1, -1], [1, 0])]:
        with pytest.raises(ValueError, match="preorder"):
            host_tiles(np.array(par), np.array(dep), 4)


def test_host_tiles_reject_what_the_numpy_layout_rejects() -> None:
    """One row's parent or depth changed at random: both accept, or both refuse."""
    rng = np.random.default_rng(7)
    verdicts = set()
    for trial in range(400):
        parent, depth = random_forest(rng, int(rng.integers(2, 60)), int(rng.integers(1, 7)))
        parent, depth = parent.copy(), depth.copy()
        i = int(rng.integers(len(depth)))
        if trial % 2:
            parent[i] = int(rng.integers(-1, len(depth)))
        else:
            depth[i] = int(rng.integers(0, depth.max() + 2))
        dm = max(int(depth.max()), 1)
        ok = _accepts(tree_layout, parent, depth, dm)
        assert _accepts(host_tiles, parent, depth, dm, 32) == ok, (parent, depth)
        verdicts.add(ok)
    assert verdicts == {True, False}
