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
    """Build the radix trie of every partition in `sk` from its sorted keys and LCPs.

    One compiled stack pass over the LCPs (agpt.trie.native.radix_core); the output is
    byte-identical to `radix_from_keys_reference`, which remains the oracle in the tests.
    """
    from agpt.trie import native

    keys = np.ascontiguousarray(sk.keys)
    m, w = keys.shape
    if 3 * m + 2 >= np.iinfo(np.int32).max:  # the kernel indexes nodes with int32
        return radix_from_keys_reference(sk, token_dtype)
    parent, head, end, first, mass, count_ptr, ctok, count_value = native.radix_core(
        keys, sk.klen, sk.lcp, np.asarray(sk.seg_ptr, dtype=np.int64),
        np.asarray(sk.seg_depth, dtype=np.int16), w - 1)
    count_token = np.empty(len(ctok), dtype=token_dtype)
    np.subtract(ctok, 1, out=count_token, casting="unsafe")
    del ctok
    edge_ptr = _ptr((end - head + 1).astype(np.int64))
    edge_tokens = np.empty(int(edge_ptr[-1]), dtype=token_dtype)
    native.gather_edges(keys, first, head, end, edge_ptr, edge_tokens)
    part_ptr = np.searchsorted(first, sk.seg_ptr).astype(np.int64)
    return RadixTrie(parent, head, mass, edge_ptr, edge_tokens, count_ptr, count_token,
                     count_value, part_ptr)


def radix_from_keys_reference(sk: SortedKeys, token_dtype: np.dtype) -> RadixTrie:
    """`radix_from_keys` in plain NumPy (the oracle of the compiled kernel's tests).

    Works level by level (v = 1..D) on the shrinking set of key boundaries with LCP >= v, so
    every step is a linear pass or a search in one level's (sorted) nodes; indices are int32
    when the task is small enough, which is always the case at a sane memory budget.
    """
    keys = sk.keys
    m, w = keys.shape
    depth = w - 1
    it = np.int32 if 2 * m + 2 < np.iinfo(np.int32).max else np.int64
    lcp = sk.lcp                                     # (m+1,) int16, -1 at partition edges
    lv = np.minimum(lcp, depth).astype(np.int8 if depth < 127 else np.int16)
    path = np.minimum(sk.klen, depth).astype(lv.dtype)

    # Internal nodes, level by level: an interval of value v is a maximal run of boundaries
    # with LCP >= v that holds one equal to v; it spans keys pos[first]-1 .. pos[last].
    lvl_s: list[np.ndarray] = []    # per level: first key of each node (ascending)
    lvl_e: list[np.ndarray] = []    # last key
    lvl_b: list[np.ndarray] = []    # boundaries with LCP == v (where the node's runs split)
    pos = np.flatnonzero(lv >= 1).astype(it)
    val = lv[pos]
    for v in range(1, depth + 1):
        if v > 1:
            keep = val >= v
            pos, val = pos[keep], val[keep]
        if pos.size == 0:
            break
        brk = np.flatnonzero(pos[1:] - pos[:-1] != 1) + 1
        rs = np.concatenate(([0], brk))
        re_ = np.concatenate((brk, [pos.size]))
        at_v = val == v
        eqc = np.concatenate(([0], np.cumsum(at_v, dtype=it)))
        has = eqc[re_] > eqc[rs]
        lvl_s.append(pos[rs[has]] - 1)
        lvl_e.append(pos[re_[has] - 1])
        b = pos[at_v]
        if v == depth:  # LCP D+1 (identical keys) does not split a depth-D node's counts
            b = b[lcp[b] == depth]
        lvl_b.append(b)
    del pos, val
    n_lvl = np.array([len(x) for x in lvl_s], dtype=np.int64)
    lvl_off = np.concatenate(([0], np.cumsum(n_lvl)))
    n_int = int(lvl_off[-1])
    # Keys that end in a leaf of their own.
    single = np.flatnonzero(np.maximum(lv[:m], lv[1:]) < path).astype(it)
    n = n_int + len(single)

    # Node arrays in "level order": internal nodes of level 1, 2, ..., D, then the leaves.
    s = np.concatenate([*lvl_s, single]) if n else np.zeros(0, it)
    e = np.concatenate([*lvl_e, single]) if n else np.zeros(0, it)
    v = np.concatenate([np.full(len(x), k, lv.dtype) for k, x in enumerate(lvl_s, 1)]
                       + [path[single]]) if n else np.zeros(0, lv.dtype)

    # Parent: the node of value pv = max(LCP at both edges) whose key range holds key s.
    pv = np.maximum(lv[s], lv[e + 1])
    lo = np.zeros(n, dtype=it)  # level-order index of the parent (-1: a partition root)
    lo[:] = -1
    order = np.argsort(pv, kind="stable")
    bounds = np.searchsorted(pv[order], np.arange(depth + 2))
    for L in range(1, min(len(lvl_s), depth) + 1):
        q = order[bounds[L]: bounds[L + 1]]
        if q.size:
            lo[q] = np.searchsorted(lvl_s[L - 1], s[q], side="right") - 1 + lvl_off[L - 1]
    del order
    is_root = pv < 0
    seg = np.searchsorted(sk.seg_ptr, s, side="right") - 1
    head = np.where(is_root, sk.seg_depth[seg], pv + 1).astype(np.int16)
    del seg, pv, is_root

    # Next-token counts at each endpoint, level by level: a node's keys split into runs at its
    # LCP == v boundaries; a run's token is the (v+1)-th token of its first key (0: the keys
    # that end there, which have no successor and are not counted).
    c_len = np.zeros(n, dtype=it)          # count entries per node (level order)
    c_node, c_tok, c_val = [], [], []
    for L in range(1, len(lvl_s) + 1):
        sL, eL, bL = lvl_s[L - 1], lvl_e[L - 1], lvl_b[L - 1]
        owner = np.searchsorted(sL, bL, side="right") - 1
        k = len(sL)
        # run starts of node i: sL[i], then its boundaries; entry index of each in node order
        idx_s = np.arange(k) + np.searchsorted(owner, np.arange(k))
        idx_b = np.arange(len(bL)) + owner + 1
        g_start = np.empty(k + len(bL), dtype=it)
        g_own = np.empty(k + len(bL), dtype=it)
        g_start[idx_s], g_own[idx_s] = sL, np.arange(k)
        g_start[idx_b], g_own[idx_b] = bL, owner
        g_end = np.empty_like(g_start)
        g_end[:-1] = g_start[1:]
        last = np.ones(len(g_start), dtype=bool)
        last[:-1] = g_own[1:] != g_own[:-1]
        g_end[last] = eL[g_own[last]] + 1
        tok = keys[g_start, L]
        real = tok != 0
        own = g_own[real] + lvl_off[L - 1]
        c_node.append(own)
        c_tok.append(tok[real])
        c_val.append((g_end - g_start)[real])
        c_len[lvl_off[L - 1]: lvl_off[L]] = np.bincount(g_own[real], minlength=k)
    del lvl_b
    # a leaf has one run (itself); it has a successor only at depth D with klen = D+1
    ltok = keys[single, path[single].astype(np.int64)]
    lreal = np.flatnonzero(ltok != 0)
    c_node.append((n_int + lreal).astype(it))
    c_tok.append(ltok[lreal])
    c_val.append(np.ones(len(lreal), dtype=it))
    c_len[n_int:] = ltok != 0
    del ltok, lreal, lvl_s, lvl_e

    # Preorder (= lexicographic order): by first key, ancestors (smaller v) first.
    pre = np.lexsort((v, s)).astype(it)     # pre[j] = level-order index of the j-th node
    rank = np.empty(n, dtype=it)            # rank[level-order index] = preorder index
    rank[pre] = np.arange(n, dtype=it)
    s, e, v, head, lo, c_len = s[pre], e[pre], v[pre], head[pre], lo[pre], c_len[pre]
    parent = np.where(lo >= 0, rank[np.maximum(lo, 0)], -1).astype(np.int64)
    del lo
    count_ptr = _ptr(c_len)
    # scatter the count entries into preorder: entry j of a node goes to count_ptr[node] + j
    c_node_l = np.concatenate(c_node)
    c_t = np.concatenate(c_tok)
    c_v = np.concatenate(c_val)
    del c_node, c_tok, c_val
    first = np.ones(len(c_node_l), dtype=bool)       # entries of one node are contiguous
    first[1:] = c_node_l[1:] != c_node_l[:-1]
    fidx = np.flatnonzero(first)
    within = np.arange(len(c_node_l), dtype=np.int64) - np.repeat(fidx, np.diff(
        np.append(fidx, len(c_node_l))))
    dest = count_ptr[rank[c_node_l]] + within
    del first, fidx, within, c_node_l
    count_token = np.empty(len(dest), dtype=token_dtype)
    count_value = np.empty(len(dest), dtype=np.int64)
    count_token[dest] = c_t - 1
    count_value[dest] = c_v
    del dest, c_t, c_v

    # Masses: the head of an edge longer than one token has every key of the node; the
    # endpoint loses the keys that end there (corpus-end occurrences), i.e. it is the sum of
    # its counts.
    elen = (v - head + 1).astype(np.int64)
    cs = np.concatenate(([0], np.cumsum(count_value)))
    end_mass = cs[count_ptr[1:]] - cs[count_ptr[:-1]]
    del cs
    mass = np.where(elen > 1, (e - s + 1).astype(np.int64), end_mass)
    del end_mass, e
    edge_ptr = _ptr(elen)
    edge_tokens = gather_edges(keys, s, head - 1, v, token_dtype)
    part_ptr = np.searchsorted(s, sk.seg_ptr).astype(np.int64)
    return RadixTrie(parent, head, mass, edge_ptr, edge_tokens, count_ptr, count_token,
                     count_value, part_ptr)


def _ptr(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def gather_edges(keys: np.ndarray, row: np.ndarray, col0: np.ndarray, col1: np.ndarray,
                 token_dtype: np.dtype, block: int = 1 << 18) -> np.ndarray:
    """keys[row, col0 : col1] - 1 for each node, concatenated, in bounded-memory blocks.

    Each block gathers its rows whole and keeps the edge columns with a 2-D mask, which is
    much cheaper than building one flat index per edge token.
    """
    n, w = len(row), keys.shape[1]
    cd = np.int8 if w < 127 else np.int16  # narrow compares: this runs over n x w cells
    col0 = np.asarray(col0).astype(cd)
    col1 = np.asarray(col1).astype(cd)
    total = int((col1.astype(np.int64) - col0).sum())
    out = np.empty(total, dtype=token_dtype)
    cols = np.arange(w, dtype=cd)[None, :]
    at = 0
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        sub = keys[row[lo:hi]]
        mask = cols >= col0[lo:hi, None]
        mask &= cols < col1[lo:hi, None]
        got = sub[mask]
        np.subtract(got, 1, out=out[at: at + len(got)], casting="unsafe")
        at += len(got)
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
