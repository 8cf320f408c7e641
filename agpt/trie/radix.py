"""The lossless radix trie of sorted keys, and its expansion to the leveled trie.

Radix nodes are the LCP intervals of the sorted keys (plus keys that end alone in a leaf):
an interval of value v is a maximal run of keys whose adjacent LCPs are all >= v with at
least one equal to v. Its edge runs from its parent interval's value + 1 to v. Every step is
a vectorised pass over arrays, so a partition is built at NumPy speed.

Along an edge every position has one successor (the next edge token) with count equal to the
head mass; only the endpoint can have less mass (by the corpus-end occurrences that stop there,
SPEC §4), and its counts are stored explicitly, so the expansion is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agpt.trie.keys import SortedKeys


@dataclass
class RadixTrie:
    """Radix nodes of one or more partitions, in depth-first preorder (= lexicographic order).

    Node x's edge holds the tokens at depths head[x] .. head[x] + len - 1 of its path;
    mass[x] is the mass at the head; counts are the next-token counts at the endpoint.
    parent[x] is -1 for a partition root (its parent is the partition's spine node).
    """

    parent: np.ndarray       # (R,) int64
    head: np.ndarray         # (R,) int16
    mass: np.ndarray         # (R,) int64
    edge_ptr: np.ndarray     # (R+1,) int64
    edge_tokens: np.ndarray  # (E,) token ids
    count_ptr: np.ndarray    # (R+1,) int64
    count_token: np.ndarray  # (C,) token ids
    count_value: np.ndarray  # (C,) int64
    part_ptr: np.ndarray     # (P+1,) node offsets of the partitions

    @property
    def n_nodes(self) -> int:
        return len(self.parent)

    @property
    def end(self) -> np.ndarray:
        """Depth of each node's endpoint (its path length)."""
        return (self.head + np.diff(self.edge_ptr) - 1).astype(np.int16)

    @property
    def end_mass(self) -> np.ndarray:
        """Mass at each endpoint: the sum of its next-token counts."""
        c = np.concatenate(([0], np.cumsum(self.count_value, dtype=np.int64)))
        return c[self.count_ptr[1:]] - c[self.count_ptr[:-1]]

    def partition(self, p: int) -> RadixTrie:
        """The nodes of partition p alone (parents re-based to the slice)."""
        a, b = int(self.part_ptr[p]), int(self.part_ptr[p + 1])
        return self.slice(a, b)

    def slice(self, a: int, b: int) -> RadixTrie:
        ea, eb = int(self.edge_ptr[a]), int(self.edge_ptr[b])
        ca, cb = int(self.count_ptr[a]), int(self.count_ptr[b])
        par = self.parent[a:b]
        return RadixTrie(np.where(par >= 0, par - a, -1), self.head[a:b], self.mass[a:b],
                         self.edge_ptr[a: b + 1] - ea, self.edge_tokens[ea:eb],
                         self.count_ptr[a: b + 1] - ca, self.count_token[ca:cb],
                         self.count_value[ca:cb], np.array([0, b - a], dtype=np.int64))


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s+len) for each pair (vectorised)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offs = np.cumsum(lengths) - lengths
    return np.repeat(np.asarray(starts, dtype=np.int64) - offs, lengths) + np.arange(total)


def radix_from_keys(sk: SortedKeys, token_dtype: np.dtype) -> RadixTrie:
    """Build the radix trie of every partition in `sk` from its sorted keys and LCPs."""
    keys, klen = sk.keys, sk.klen.astype(np.int64)
    m, w = keys.shape
    depth = w - 1
    lcp = sk.lcp.astype(np.int32)
    lv = np.minimum(lcp, depth)  # structure uses LCPs up to D; the (D+1)-th token gives counts

    # LCP intervals, level by level over the shrinking set of positions with LCP >= v.
    starts, ends, vals = [], [], []
    pos = np.flatnonzero(lv >= 1)
    val = lv[pos]
    for v in range(1, depth + 1):
        if v > 1:
            keep = val >= v
            pos, val = pos[keep], val[keep]
        if pos.size == 0:
            break
        brk = np.flatnonzero(np.diff(pos) != 1) + 1
        rs = np.concatenate(([0], brk))
        re_ = np.concatenate((brk, [pos.size]))
        eqc = np.concatenate(([0], np.cumsum(val == v)))
        has = eqc[re_] > eqc[rs]
        starts.append(pos[rs[has]] - 1)
        ends.append(pos[re_[has] - 1])
        vals.append(np.full(int(has.sum()), v, dtype=np.int64))
    # Keys that end in a leaf of their own.
    path = np.minimum(klen, depth)
    single = np.flatnonzero(np.maximum(lv[:m], lv[1:]) < path)
    starts.append(single)
    ends.append(single)
    vals.append(path[single])
    # (temporaries are dropped as soon as they are used: this runs at the memory budget)
    s = np.concatenate(starts).astype(np.int64)
    e = np.concatenate(ends).astype(np.int64)
    v = np.concatenate(vals).astype(np.int64)
    del starts, ends, vals, pos, val, single
    order = np.lexsort((v, s))  # preorder: by first key, ancestors (smaller v) first
    s, e, v = s[order], e[order], v[order]
    del order
    n = len(s)

    # Parent: the interval of value max(LCP at both edges) that contains the first key.
    pv = np.maximum(lv[s], lv[e + 1]).astype(np.int64)
    seg = np.searchsorted(sk.seg_ptr, s, side="right") - 1
    is_root = pv < 0
    head = np.where(is_root, sk.seg_depth[seg], pv + 1).astype(np.int16)
    del seg
    by_level = v * (m + 1) + s
    o2 = np.argsort(by_level, kind="stable")
    k2 = by_level[o2]
    del by_level

    def node_at(level: np.ndarray, key: np.ndarray) -> np.ndarray:
        """Index of the node of value `level` whose key range contains key index `key`."""
        return o2[np.searchsorted(k2, level * (m + 1) + key, side="right") - 1]

    parent = np.full(n, -1, dtype=np.int64)
    nr = np.flatnonzero(~is_root)
    parent[nr] = node_at(pv[nr], s[nr])
    del nr, pv, is_root

    # Masses: keys that end at the endpoint (corpus-end occurrences) do not count there.
    size = e - s + 1
    term = np.flatnonzero(klen <= depth)
    n_term = np.bincount(node_at(klen[term], term), minlength=n) if term.size else 0
    end_mass = size - n_term
    elen = v - head + 1
    mass = np.where(elen > 1, size, end_mass).astype(np.int64)
    del size, end_mass, term
    edge_ptr = _ptr(elen)
    edge_tokens = gather_edges(keys, s, head.astype(np.int64) - 1, elen, token_dtype)
    del elen

    # Next-token counts at each endpoint: its keys split into runs by LCP == v.
    bpos = np.flatnonzero((lcp[1:m] >= 1) & (lcp[1:m] <= depth)) + 1
    g_start = np.concatenate((s, bpos))
    g_owner = np.concatenate((np.arange(n), node_at(lcp[bpos].astype(np.int64), bpos - 1)))
    go = np.lexsort((g_start, g_owner))
    g_start, g_owner = g_start[go], g_owner[go]
    same = np.zeros(len(g_start), dtype=bool)
    same[:-1] = g_owner[1:] == g_owner[:-1]
    g_end = np.where(same, np.roll(g_start, -1), e[g_owner] + 1)
    g_tok = keys[g_start, v[g_owner]].astype(np.int64)
    real = g_tok > 0  # 0: the keys that end here (no successor)
    count_token = (g_tok[real] - 1).astype(token_dtype)
    count_value = (g_end - g_start)[real].astype(np.int64)
    count_ptr = _ptr(np.bincount(g_owner[real], minlength=n))
    del g_start, g_owner, g_end, g_tok, real, same, go
    part_ptr = np.searchsorted(s, sk.seg_ptr).astype(np.int64)
    return RadixTrie(parent, head, mass, edge_ptr, edge_tokens, count_ptr, count_token,
                     count_value, part_ptr)


def _ptr(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def gather_edges(keys: np.ndarray, row: np.ndarray, col0: np.ndarray, length: np.ndarray,
                 token_dtype: np.dtype, block: int = 1 << 20) -> np.ndarray:
    """keys[row, col0 : col0+length] - 1 for each node, concatenated, in bounded-memory blocks."""
    total = int(length.sum())
    out = np.empty(total, dtype=token_dtype)
    flat = keys.reshape(-1)
    w = keys.shape[1]
    cum = np.cumsum(length)
    lo_node, lo = 0, 0
    while lo < total:
        hi_node = int(np.searchsorted(cum, lo + block, side="right"))
        hi_node = max(hi_node, lo_node + 1)
        ln = length[lo_node:hi_node]
        idx = ranges(row[lo_node:hi_node] * w + col0[lo_node:hi_node], ln)
        hi = lo + len(idx)
        out[lo:hi] = flat[idx] - 1
        lo_node, lo = hi_node, hi
    return out


@dataclass
class LeveledDepth:
    """The leveled nodes of one depth, in lexicographic order.

    parent indexes the previous depth's nodes of the same RadixTrie; -1 marks partition roots.
    """

    token: np.ndarray
    parent: np.ndarray
    mass: np.ndarray
    count_ptr: np.ndarray
    count_token: np.ndarray
    count_value: np.ndarray
    part_ptr: np.ndarray  # (P+1,) node offsets of the partitions at this depth

    @property
    def n_nodes(self) -> int:
        return len(self.token)


def expand(rt: RadixTrie, max_depth: int) -> list[LeveledDepth]:
    """The leveled trie of `rt`: element k-1 holds depth k (empty depths included)."""
    n = rt.n_nodes
    head = rt.head.astype(np.int64)
    end = rt.end.astype(np.int64)
    clen = np.diff(rt.count_ptr)
    end_mass = rt.end_mass
    node_part = np.repeat(np.arange(len(rt.part_ptr) - 1), np.diff(rt.part_ptr))
    n_parts = len(rt.part_ptr) - 1
    prev_pos = np.full(n, -1, dtype=np.int64)
    out: list[LeveledDepth] = []
    for k in range(1, max_depth + 1):
        idx = np.flatnonzero((head <= k) & (end >= k))
        off = k - head[idx]
        token = rt.edge_tokens[rt.edge_ptr[idx] + off]
        at_end = end[idx] == k
        up = np.where(off > 0, idx, rt.parent[idx])
        parent = np.where(up >= 0, prev_pos[np.maximum(up, 0)], -1)
        mass = np.where(at_end, end_mass[idx], rt.mass[idx])
        n_entries = np.where(at_end, clen[idx], 1)
        ptr = _ptr(n_entries)
        ctok = np.empty(int(ptr[-1]), dtype=rt.count_token.dtype)
        cval = np.empty(int(ptr[-1]), dtype=np.int64)
        mid = np.flatnonzero(~at_end)
        ctok[ptr[mid]] = rt.edge_tokens[rt.edge_ptr[idx[mid]] + off[mid] + 1]
        cval[ptr[mid]] = rt.mass[idx[mid]]
        fin = np.flatnonzero(at_end)
        src = ranges(rt.count_ptr[idx[fin]], clen[idx[fin]])
        dst = ranges(ptr[fin], clen[idx[fin]])
        ctok[dst] = rt.count_token[src]
        cval[dst] = rt.count_value[src]
        part_ptr = _ptr(np.bincount(node_part[idx], minlength=n_parts))
        out.append(LeveledDepth(token, parent, mass, ptr, ctok, cval, part_ptr))
        prev_pos[:] = -1
        prev_pos[idx] = np.arange(len(idx))
    return out


def prune(rt: RadixTrie, min_mass: int, min_depth: int) -> RadixTrie:
    """Drop every node (and its subtree) with mass < min_mass at depth >= min_depth.

    The rule is applied per trie position, so an edge that crosses the cut is truncated at
    depth min_depth-1; a truncated endpoint keeps its next-token counts (its successors are
    gone from the trie, not from its prediction target).
    """
    if min_mass <= 0:
        return rt
    n = rt.n_nodes
    head = rt.head.astype(np.int64)
    end = rt.end.astype(np.int64)
    end_mass = rt.end_mass
    lo = np.maximum(head, min_depth)
    # first pruned depth on each edge (or end+1 when the whole edge survives)
    cut = np.full(n, end + 1)
    inner = (rt.mass < min_mass) & (lo < end)      # an inner position fails
    cut = np.where(inner, lo, cut)
    tail = (end_mass < min_mass) & (end >= lo) & ~inner  # only the endpoint fails
    cut = np.where(tail, end, cut)
    # subtree ranges in preorder: a node's subtree is [x, x + size)
    size = _subtree_sizes(rt.parent, end)
    cut_here = cut <= end
    drop = np.zeros(n + 1, dtype=np.int64)
    starts = np.flatnonzero(cut_here)
    first = np.where(cut[starts] == head[starts], starts, starts + 1)
    np.add.at(drop, first, 1)
    np.add.at(drop, starts + size[starts], -1)
    keep = np.cumsum(drop[:-1]) == 0
    new_end = np.where(cut_here, cut - 1, end)
    return _rebuild(rt, keep, new_end)


def _subtree_sizes(parent: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Nodes in each subtree (self included), accumulated from the deepest level up."""
    n = len(parent)
    size = np.ones(n, dtype=np.int64)
    for d in range(int(end.max(initial=0)), 0, -1):
        at = np.flatnonzero((end == d) & (parent >= 0))
        np.add.at(size, parent[at], size[at])
    return size


def _rebuild(rt: RadixTrie, keep: np.ndarray, new_end: np.ndarray) -> RadixTrie:
    """Keep the marked nodes; truncate edges to new_end (truncated endpoints count one token)."""
    idx = np.flatnonzero(keep)
    new_index = np.cumsum(keep) - 1
    par = rt.parent[idx]
    parent = np.where(par >= 0, new_index[np.maximum(par, 0)], -1)
    head = rt.head[idx]
    end = rt.end.astype(np.int64)[idx]
    nend = new_end[idx]
    elen = nend - head + 1
    edge_tokens = rt.edge_tokens[ranges(rt.edge_ptr[idx], elen)]
    trunc = nend < end
    clen = np.where(trunc, 1, np.diff(rt.count_ptr)[idx])
    count_ptr = _ptr(clen)
    ctok = np.empty(int(count_ptr[-1]), dtype=rt.count_token.dtype)
    cval = np.empty(int(count_ptr[-1]), dtype=np.int64)
    t = np.flatnonzero(trunc)
    ctok[count_ptr[t]] = rt.edge_tokens[rt.edge_ptr[idx[t]] + elen[t]]
    cval[count_ptr[t]] = rt.mass[idx[t]]
    f = np.flatnonzero(~trunc)
    dst = ranges(count_ptr[f], clen[f])
    src = ranges(rt.count_ptr[idx[f]], clen[f])
    ctok[dst] = rt.count_token[src]
    cval[dst] = rt.count_value[src]
    part_ptr = np.concatenate(([0], np.cumsum(keep)))[rt.part_ptr]
    return RadixTrie(parent, head, rt.mass[idx], _ptr(elen), edge_tokens, count_ptr, ctok, cval,
                     part_ptr.astype(np.int64))
