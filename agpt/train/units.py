"""Trie units: the rows the trainer computes for one partition (or for the spine).

A unit is a forest of rows in depth-first preorder (one row = one trie position = one context),
each with its token, parent row, depth and next-token counts. Rows flagged `loss=False` are
context only (the spine prefix above a partition root): they are recomputed because their K/V
are needed, and they receive gradient, but their own loss is counted in the spine unit, so
every node's loss counts exactly once per epoch (SPEC §8).

`chunks` cuts a unit into pieces under a row budget without changing the math: a contiguous
preorder range plus the ancestors of its first row is closed under "ancestor of", so each
piece is computed exactly, and the unit's gradient is the sum of its pieces' gradients.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from agpt.store.trie import Spine, TrieStore
from agpt.trie.radix import RadixTrie, ranges


@dataclass
class Unit:
    name: str
    token: np.ndarray        # (N,) token ids
    parent: np.ndarray       # (N,) int64 row index, -1 at depth 1
    depth: np.ndarray        # (N,) int32, 1-based
    count_ptr: np.ndarray    # (N+1,) CSR next-token counts
    count_token: np.ndarray
    count_value: np.ndarray
    loss: np.ndarray         # (N,) bool: the row's loss counts in this unit

    @property
    def n_rows(self) -> int:
        return len(self.token)

    @property
    def n_loss_rows(self) -> int:
        return int(self.loss.sum())

    def piece(self, s: int, e: int) -> Unit:
        """Rows s..e-1 (their loss flags kept) after the ancestors of row s (context, no loss).

        In depth-first preorder a row's parent before s is an ancestor of s, and the ancestor
        at depth k is context row k-1, so the piece is slices plus a few gathered rows (a
        general gather over the rows took ~0.45 s for a 4M-row unit, on the loader's clock)."""
        anc = []
        r = int(self.parent[s]) if e > s else -1
        while r >= 0:
            anc.append(r)
            r = int(self.parent[r])
        up = np.asarray(anc[::-1], dtype=np.int64)
        a = len(up)
        par = self.parent[s:e] - (s - a)                   # parents inside the range
        out = (self.parent[s:e] >= 0) & (self.parent[s:e] < s)
        par[out] = self.depth[s:e][out] - 2                # an ancestor of s: context row
        par[self.parent[s:e] < 0] = -1
        cp = self.count_ptr
        clen = np.diff(cp)[up]
        src = ranges(cp[up], clen)
        c0, c1 = int(cp[s]), int(cp[e])
        return Unit(self.name, np.concatenate([self.token[up], self.token[s:e]]),
                    np.concatenate([np.arange(a) - 1, par]),
                    np.concatenate([self.depth[up], self.depth[s:e]]),
                    np.concatenate([_ptr(clen), cp[s + 1:e + 1] - c0 + int(clen.sum())]),
                    np.concatenate([self.count_token[src], self.count_token[c0:c1]]),
                    np.concatenate([self.count_value[src], self.count_value[c0:c1]]),
                    np.concatenate([np.zeros(a, bool), self.loss[s:e]]))


def _ptr(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)))


def spine_chain(spine: Spine, node: int) -> list[int]:
    """Spine indices from depth 1 down to `node` (empty for the root)."""
    out = []
    while node >= 0 and spine.depth[node] > 0:
        out.append(node)
        node = int(spine.parent[node])
    return out[::-1]


def _spine_rows(spine: Spine, nodes: list[int], loss: bool) -> Unit:
    """Spine nodes (a root-to-node chain or a whole preorder) as rows."""
    idx = np.asarray(nodes, dtype=np.int64)
    pos = {int(s): i for i, s in enumerate(idx)}
    parent = np.array([pos.get(int(spine.parent[s]), -1) for s in idx], dtype=np.int64)
    clen = np.diff(spine.count_ptr)[idx]
    src = ranges(spine.count_ptr[idx], clen)
    return Unit("spine", spine.token[idx], parent, spine.depth[idx].astype(np.int32), _ptr(clen),
                spine.count_token[src], spine.count_value[src], np.full(len(idx), loss))


def spine_unit(spine: Spine) -> Unit | None:
    """All spine nodes below the root, in preorder, with their own loss (None if only a root)."""
    n = len(spine.depth)
    if n <= 1:
        return None
    paths: list[tuple[int, ...]] = [()] * n
    for d in range(1, int(spine.depth.max()) + 1):      # parents precede children by depth
        for s in np.flatnonzero(spine.depth == d):
            paths[s] = (*paths[int(spine.parent[s])], int(spine.token[s]))
    order = sorted(range(1, n), key=lambda s: paths[s])
    return _spine_rows(spine, order, loss=True)


def radix_unit(rt: RadixTrie, context: Unit | None, name: str) -> Unit:
    """A partition's rows: its spine prefix (context) then every edge position, in preorder
    (one compiled pass, agpt.train.expand.expand_radix; equal to `radix_unit_reference`)."""
    from agpt.train.expand import expand_radix
    c = context.n_rows if context is not None else 0
    n = int(rt.edge_ptr[-1])
    # every edge position has one count except endpoints, which have their node's counts
    n_counts = n - rt.n_nodes + int(rt.count_ptr[-1])
    cc = int(context.count_ptr[-1]) if context is not None else 0
    token = np.empty(c + n, np.int64)
    parent = np.empty(c + n, np.int64)
    depth = np.empty(c + n, np.int32)
    ptr = np.empty(c + n + 1, np.int64)
    ctok = np.empty(cc + n_counts, np.int64)
    cval = np.empty(cc + n_counts, np.int64)
    loss = np.ones(c + n, bool)
    if context is not None:
        token[:c], parent[:c], depth[:c] = context.token, context.parent, context.depth
        ptr[:c + 1] = context.count_ptr
        ctok[:cc], cval[:cc] = context.count_token, context.count_value
        loss[:c] = context.loss
    else:
        ptr[0] = 0
    expand_radix(rt.parent, rt.head, rt.mass, rt.edge_ptr, rt.edge_tokens, rt.count_ptr,
                 rt.count_token, rt.count_value, c, c - 1, token, parent, depth, ptr, ctok, cval)
    return Unit(name, token, parent, depth, ptr, ctok, cval, loss)


def radix_unit_reference(rt: RadixTrie, context: Unit | None, name: str) -> Unit:
    """NumPy oracle of `radix_unit`."""
    c = context.n_rows if context is not None else 0
    elen = np.diff(rt.edge_ptr)
    n = int(rt.edge_ptr[-1])
    node = np.repeat(np.arange(rt.n_nodes), elen)
    off = np.arange(n) - rt.edge_ptr[:-1][node]
    depth = (rt.head.astype(np.int64)[node] + off).astype(np.int32)
    last = rt.edge_ptr[1:] - 1                           # endpoint row of each node
    up = rt.parent[node]
    root_parent = c - 1 if c else -1
    parent = np.where(off > 0, np.arange(n) - 1 + c,
                      np.where(up >= 0, last[np.maximum(up, 0)] + c, root_parent))
    at_end = off == elen[node] - 1
    clen = np.where(at_end, np.diff(rt.count_ptr)[node], 1)
    ptr = _ptr(clen)
    ctok = np.empty(int(ptr[-1]), dtype=np.int64)
    cval = np.empty(int(ptr[-1]), dtype=np.int64)
    mid = np.flatnonzero(~at_end)
    ctok[ptr[mid]] = rt.edge_tokens[mid + 1]
    cval[ptr[mid]] = rt.mass[node[mid]]
    fin = np.flatnonzero(at_end)
    k = np.diff(rt.count_ptr)[node[fin]]
    src = ranges(rt.count_ptr[node[fin]], k)
    dst = ranges(ptr[fin], k)
    ctok[dst] = rt.count_token[src]
    cval[dst] = rt.count_value[src]
    rows = Unit(name, rt.edge_tokens.astype(np.int64), parent.astype(np.int64), depth, ptr,
                ctok, cval, np.ones(n, dtype=bool))
    return concat(context, rows) if context is not None else rows


def concat(a: Unit, b: Unit) -> Unit:
    """Rows of a then rows of b (b's parents already index the joined rows)."""
    return Unit(b.name, np.concatenate([a.token.astype(np.int64), b.token]),
                np.concatenate([a.parent, b.parent]), np.concatenate([a.depth, b.depth]),
                np.concatenate([a.count_ptr, b.count_ptr[1:] + a.count_ptr[-1]]),
                np.concatenate([a.count_token.astype(np.int64), b.count_token]),
                np.concatenate([a.count_value, b.count_value]), np.concatenate([a.loss, b.loss]))


def partition_unit(store: TrieStore, p: int, rt: RadixTrie | None = None) -> Unit:
    """Partition p of a store's radix layer as a unit, with its spine prefix as context."""
    spine = store.spine()
    chain = spine_chain(spine, int(store.spine_parent_of_partition()[p]))
    ctx = _spine_rows(spine, chain, loss=False) if chain else None
    rt = store.radix_partition(p) if rt is None else rt
    return radix_unit(rt, ctx, f"partition {p} {store.partition_prefix(p)}")


def unit_count(store: TrieStore) -> int:
    """Units of an epoch: every partition, then the spine when it has nodes below the root."""
    return store.n_partitions + (1 if len(store.spine().depth) > 1 else 0)


def load_unit(store: TrieStore, i: int) -> Unit:
    """Unit i alone (UnitReader reads an epoch's units in blocks)."""
    if i < store.n_partitions:
        return partition_unit(store, i)
    u = spine_unit(store.spine())
    assert u is not None
    return u


#: runs of consecutive partitions are read from the store together, up to this many rows
READ_BLOCK_ROWS = 1 << 20


def read_blocks(store: TrieStore, order: Sequence[int],
                block_rows: int = READ_BLOCK_ROWS) -> list[list[int]]:
    """The partitions of `order` (in its order) as runs of consecutive partitions that are
    read from the store together, each of at most `block_rows` rows or one partition."""
    rows = store.radix_rows()
    runs: list[list[int]] = []
    total = 0
    for i in (p for p in order if p < store.n_partitions):
        if not runs or i != runs[-1][-1] + 1 or total + int(rows[i]) > block_rows:
            runs.append([])
            total = 0
        runs[-1].append(i)
        total += int(rows[i])
    return runs


@dataclass
class _Block:
    left: int                                  # units of the block not yet taken
    lock: threading.Lock = field(default_factory=threading.Lock)
    rt: RadixTrie | None = None


class UnitReader:
    """The units of an epoch, read for loader threads (thread safe).

    A run of consecutive partitions in the visiting order is one store read, up to
    READ_BLOCK_ROWS rows (a larger partition is read alone): Zarr pays a fixed cost per read
    on its one event-loop thread, under the GIL, so per-partition reads were slower than a GPU
    epoch's compute (1.9 s against 0.9 s at D=32 on the H100 machine's CPU) and no faster with
    more loaders. A block is dropped once each of its units was taken."""

    def __init__(self, store: TrieStore, order: Sequence[int], block_rows: int = READ_BLOCK_ROWS):
        self.store = store
        self._span: dict[int, tuple[int, int]] = {}        # partition -> its block (a, b)
        for run in read_blocks(store, order, block_rows):
            self._span.update((p, (run[0], run[-1] + 1)) for p in run)
        self._lock = threading.Lock()
        self._blocks: dict[tuple[int, int], _Block] = {}

    def unit(self, i: int) -> Unit:
        span = self._span.get(i)
        if span is None:
            return load_unit(self.store, i)
        with self._lock:
            blk = self._blocks.setdefault(span, _Block(span[1] - span[0]))
        with blk.lock:                        # the first taker reads, the others wait for it
            if blk.rt is None:
                blk.rt = self.store.radix_partitions(*span)
            rt = blk.rt
        with self._lock:
            blk.left -= 1
            if blk.left == 0:
                self._blocks.pop(span, None)
        return partition_unit(self.store, i, rt.partition(i - span[0]))


def chunk_spans(unit: Unit, max_rows: int) -> list[tuple[int, int]]:
    """Row ranges of `chunks`: [(0, n)] when the unit fits, else ranges of max_rows - depth
    rows (each piece adds its first row's ancestors, fewer than the unit's depth)."""
    n = unit.n_rows
    if n <= max_rows:
        return [(0, n)]
    step = max(1, max_rows - int(unit.depth.max()))
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def chunk(unit: Unit, span: tuple[int, int]) -> Unit:
    """The piece of one span of chunk_spans (the unit itself when the span is all of it)."""
    return unit if span == (0, unit.n_rows) else unit.piece(*span)


def chunks(unit: Unit, max_rows: int) -> Iterator[Unit]:
    """Pieces of at most max_rows rows (plus < depth context rows each) covering every row once."""
    for span in chunk_spans(unit, max_rows):
        yield chunk(unit, span)
