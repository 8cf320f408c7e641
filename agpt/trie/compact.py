"""Leveled -> radix compaction: the inverse of `expand`, and the store driver that uses it.

A leveled node is the endpoint of a radix edge iff its next-token counts do not pin down a
single continuation of equal mass: it has != 1 count entries, it is *terminal* (its parent's
count for its token exceeds its mass: an occurrence ends at its document's end there), it has
no child left (pruning), or it is at depth D. An edge starts at a partition root or below an
endpoint. Each step is a vectorised pass over one depth (no Python loop per node), and radix
nodes come out in depth-first preorder, i.e. the order `radix_from_keys` writes them.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from agpt.errors import AgptError, StoreFormatError
from agpt.store.format import TRIE_KIND, open_root, read_array
from agpt.trie.plan import partition_ranges
from agpt.trie.radix import LeveledDepth, RadixTrie, _ptr, ranges

_RADIX_FIELDS = ("parent", "head", "mass", "edge_ptr", "edge_tokens", "count_ptr",
                 "count_token", "count_value", "part_ptr")


def find_entries(count_ptr: np.ndarray, count_token: np.ndarray, owner: np.ndarray,
                 token: np.ndarray) -> np.ndarray:
    """Index of the count entry (owner, token) of a depth's counts, -1 where there is none.

    Entries are sorted by (owner, token), so one searchsorted on a composite key finds them
    all; entries out of order are sorted first (a damaged store must not crash verify).
    """
    out = np.full(len(owner), -1, dtype=np.int64)
    if len(owner) == 0 or len(count_token) == 0:
        return out
    base = np.int64(max(int(count_token.max()), int(token.max(initial=0))) + 1)
    own = np.repeat(np.arange(len(count_ptr) - 1, dtype=np.int64), np.diff(count_ptr))
    keys = own * base + count_token.astype(np.int64)
    o = None
    if np.any(keys[1:] < keys[:-1]):
        o = np.argsort(keys, kind="stable")
        keys = keys[o]
    q = owner.astype(np.int64) * base + token.astype(np.int64)
    j = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
    hit = keys[j] == q
    out[hit] = j[hit] if o is None else o[j[hit]]
    return out


def parent_count(prev: LeveledDepth, parent: np.ndarray, token: np.ndarray) -> np.ndarray:
    """n(parent, token) from the previous depth's counts, 0 where there is no such entry."""
    out = np.zeros(len(parent), dtype=np.int64)
    j = find_entries(prev.count_ptr, prev.count_token, parent, token)
    out[j >= 0] = prev.count_value[j[j >= 0]]
    return out


def subtree_sizes(levels: list[LeveledDepth]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(nodes in each subtree incl. itself, whether each node has a child), per depth."""
    D = len(levels)
    size: list[np.ndarray] = [np.zeros(0, np.int64)] * D
    has_child: list[np.ndarray] = [np.zeros(0, bool)] * D
    for k in range(D - 1, -1, -1):
        n = levels[k].n_nodes
        if k + 1 < D and levels[k + 1].n_nodes:
            ch = levels[k + 1].parent
            ok = ch >= 0
            below = np.bincount(ch[ok], weights=size[k + 1][ok], minlength=n)
            size[k] = 1 + np.rint(below).astype(np.int64)
            has_child[k] = np.bincount(ch[ok], minlength=n) > 0
        else:
            size[k] = np.ones(n, dtype=np.int64)
            has_child[k] = np.zeros(n, dtype=bool)
    return size, has_child


def preorder_ranks(levels: list[LeveledDepth], size: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
    """Depth-first preorder rank of every node (partitions in order), and partition offsets.

    rank(x) = rank(parent) + 1 + sizes of the earlier siblings; a depth is sorted
    lexicographically, so siblings are contiguous and a group-wise cumsum gives the last term.
    """
    P = len(levels[0].part_ptr) - 1 if levels else 0
    per_part = np.zeros(P, dtype=np.int64)
    for L in levels:
        per_part += np.diff(L.part_ptr)
    part_off = _ptr(per_part)
    ranks: list[np.ndarray] = []
    prev = np.zeros(0, dtype=np.int64)
    for k, L in enumerate(levels):
        n = L.n_nodes
        par = L.parent.astype(np.int64)
        root = par < 0
        new = np.ones(n, dtype=bool)
        if n > 1:
            new[1:] = root[1:] | (par[1:] != par[:-1])
        excl = np.cumsum(size[k]) - size[k]
        first = np.maximum.accumulate(np.where(new, np.arange(n), 0))
        within = excl - excl[first]
        pid = np.repeat(np.arange(P), np.diff(L.part_ptr))
        base = np.where(root, part_off[pid], 0)
        nr = ~root
        base[nr] = prev[par[nr]] + 1
        ranks.append(base + within)
        prev = ranks[-1]
    return ranks, part_off


def compact(levels: list[LeveledDepth], root_depth: int | np.ndarray,
            root_count: np.ndarray | None = None, max_depth: int | None = None) -> RadixTrie:
    """The radix trie whose expansion is `levels` (one or several consecutive partitions).

    levels[k-1] holds depth k (as `expand` returns it). root_depth: each partition root's
    depth (an int for all). root_count: each root's count in its spine parent (= the
    partition's size, the starts under it); it decides whether a root is terminal, which the
    partition alone cannot tell. Without it roots are taken as non-terminal. max_depth (D,
    default len(levels)): depth-D nodes always end an edge.
    """
    D = max_depth if max_depth is not None else len(levels)
    if len(levels) < D:
        raise ValueError(f"compact: {len(levels)} depths given for max_depth {D}")
    P = len(levels[0].part_ptr) - 1 if levels else 0
    tok_dtype = levels[0].token.dtype if levels else np.dtype(np.uint8)
    ctok_dtype = levels[0].count_token.dtype if levels else tok_dtype
    root_depth = np.broadcast_to(np.asarray(root_depth, dtype=np.int64), (P,))
    size, has_child = subtree_sizes(levels)
    ranks, part_off = preorder_ranks(levels, size)

    h_rank, h_depth, h_mass, h_parent, h_nent, h_count_src, e_depth = [], [], [], [], [], [], []
    eids: list[np.ndarray] = []
    next_id = 0
    ep_prev = np.zeros(0, dtype=bool)
    eid_prev = np.zeros(0, dtype=np.int64)
    for k in range(1, len(levels) + 1):
        L = levels[k - 1]
        n = L.n_nodes
        par = L.parent.astype(np.int64)
        root = par < 0
        pid = np.repeat(np.arange(P), np.diff(L.part_ptr))
        if root.any() and np.any(root_depth[pid[root]] != k):
            raise ValueError(f"compact: a partition root at depth {k} is not at its root depth")
        nr = ~root
        pc = np.empty(n, dtype=np.int64)
        if k > 1:
            pc[nr] = parent_count(levels[k - 2], par[nr], L.token[nr])
        elif nr.any():
            raise ValueError("compact: a depth-1 node has a parent")
        pc[root] = L.mass[root] if root_count is None else np.asarray(root_count)[pid[root]]
        nent = np.diff(L.count_ptr)
        ep = (k >= D) | (nent != 1) | ~has_child[k - 1] | (pc > L.mass)
        head = root.copy()
        head[nr] = ep_prev[par[nr]]
        eid = np.empty(n, dtype=np.int64)
        nh = int(head.sum())
        eid[head] = np.arange(next_id, next_id + nh)
        nh_mask = ~head
        eid[nh_mask] = eid_prev[par[nh_mask]]
        next_id += nh
        h_rank.append(ranks[k - 1][head])
        h_depth.append(np.full(nh, k, dtype=np.int64))
        h_mass.append(L.mass[head].astype(np.int64))
        hp = np.full(nh, -1, dtype=np.int64)
        hnr = nr[head]
        hp[hnr] = eid_prev[par[head][hnr]]
        h_parent.append(hp)
        # endpoints: (edge id, end depth, count entries, where they are)
        e_ids = eid[ep]
        h_nent.append((e_ids, nent[ep]))
        h_count_src.append((e_ids, L.count_ptr[:-1][ep]))
        e_depth.append((e_ids, k))
        eids.append(eid)
        ep_prev, eid_prev = ep, eid

    R = next_id
    rank = np.concatenate(h_rank) if h_rank else np.zeros(0, np.int64)
    order = np.argsort(rank, kind="stable")
    final = np.empty(R, dtype=np.int64)
    final[order] = np.arange(R)
    hd = np.concatenate(h_depth) if h_depth else np.zeros(0, np.int64)
    end = np.zeros(R, dtype=np.int64)
    nent_r = np.zeros(R, dtype=np.int64)
    for (ids, k), (_, ne) in zip(e_depth, h_nent, strict=True):
        end[ids] = k
        nent_r[ids] = ne
    hpar = np.concatenate(h_parent) if h_parent else np.zeros(0, np.int64)
    parent = np.where(hpar >= 0, final[np.maximum(hpar, 0)], -1)[order]
    elen = (end - hd + 1)[order]
    edge_ptr = _ptr(elen)
    count_ptr = _ptr(nent_r[order])
    edge_tokens = np.empty(int(edge_ptr[-1]), dtype=tok_dtype)
    count_token = np.empty(int(count_ptr[-1]), dtype=ctok_dtype)
    count_value = np.empty(int(count_ptr[-1]), dtype=np.int64)
    for k, (L, eid, (ids, src)) in enumerate(zip(levels, eids, h_count_src, strict=True), 1):
        fe = final[eid]
        edge_tokens[edge_ptr[fe] + (k - hd[eid])] = L.token
        ne = nent_r[ids]
        dst = ranges(count_ptr[final[ids]], ne)
        s = ranges(src, ne)
        count_token[dst] = L.count_token[s]
        count_value[dst] = L.count_value[s]
    part_ptr = np.searchsorted(rank[order], part_off).astype(np.int64)
    return RadixTrie(parent=parent, head=hd[order].astype(np.int16),
                     mass=(np.concatenate(h_mass) if h_mass else np.zeros(0, np.int64))[order],
                     edge_ptr=edge_ptr, edge_tokens=edge_tokens, count_ptr=count_ptr,
                     count_token=count_token, count_value=count_value, part_ptr=part_ptr)


# ---------------------------------------------------------------------------------------------
# Store driver
# ---------------------------------------------------------------------------------------------

def read_leveled(group: Any, url: str, lp: np.ndarray, a: int, b: int) -> list[LeveledDepth]:
    """Partitions a..b-1 of a store's leveled layer, one LeveledDepth per depth (local parents).

    lp is partitions/leveled_ptr (D, P+1); I/O is proportional to the partitions' size.
    """
    out = []
    for k in range(1, lp.shape[0] + 1):
        lo, hi = int(lp[k - 1, a]), int(lp[k - 1, b])
        base = int(lp[k - 2, a]) if k > 1 else 0
        cptr = read_array(group, "leveled/count_ptr", url, slice(lo, hi + 1))
        c0, c1 = int(cptr[0]), int(cptr[-1])
        par = read_array(group, "leveled/parent", url, slice(lo, hi))
        out.append(LeveledDepth(
            token=read_array(group, "leveled/token", url, slice(lo, hi)),
            parent=np.where(par >= 0, par - base, -1),
            mass=read_array(group, "leveled/mass", url, slice(lo, hi)),
            count_ptr=cptr - c0,
            count_token=read_array(group, "leveled/count_token", url, slice(c0, c1)),
            count_value=read_array(group, "leveled/count_value", url, slice(c0, c1)),
            part_ptr=lp[k - 1, a: b + 1] - lp[k - 1, a]))
    return out


def batches(sizes: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Consecutive partition ranges of at most `budget` nodes (a bigger partition stands alone)."""
    return partition_ranges(sizes, budget)


def is_trie_store(url: str) -> bool:
    """Whether url opens as an AGPT trie store (of any status)."""
    try:
        meta = open_root(url, "r").attrs.get("agpt")
    except StoreFormatError:
        return False
    return isinstance(meta, dict) and meta.get("format") == TRIE_KIND


def radix_from_leveled_store(url: str, progress: bool = False, out: str | None = None,
                             max_depth: int | None = None, batch_nodes: int = 1 << 22) -> dict[str, Any]:
    """Add the radix layer to the trie store at url, compacted from its leveled layer.

    Partition ranges of at most batch_nodes leveled nodes are compacted one at a time and
    staged to disk (the writer needs the totals before it starts), so memory stays bounded.
    """
    from agpt.store.trie import TrieWriter, open_trie

    t0 = time.perf_counter()
    if out is not None and os.path.abspath(out) != os.path.abspath(url) and out != url:
        raise AgptError(f"{url} is a trie store: build-radix adds the radix layer to it in place; "
                        "leave out -o or give the same store")
    store = open_trie(url)
    D = store.max_depth
    if max_depth is not None and max_depth != D:
        raise AgptError(f"{url} has depth {D}, not {max_depth}: pass -D {D}")
    if "radix" in store.layers:
        _say(progress, f"{url} already has a complete radix layer; nothing to do")
        return {"store": url, "layer": "radix", "skipped": True, **store.totals()}
    if "leveled" not in store.layers:
        raise AgptError(f"{url} has no leveled layer to compact: run agpt build-index, or "
                        "build-radix from the corpus store")
    g = store.group
    lp = read_array(g, "partitions/leveled_ptr", url)
    prefix_len = np.array([len(p) for p in store.partition_prefixes()], dtype=np.int64)
    sizes = store.partition_sizes
    part_nodes = (lp[:, 1:] - lp[:, :-1]).sum(axis=0)
    work = (os.path.abspath(url.rstrip("/")) + ".compact.work" if "://" not in url
            else tempfile.mkdtemp(prefix="agpt-compact-"))
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        staged, R, E, C = [], 0, 0, 0
        todo = batches(part_nodes, batch_nodes)
        with ThreadPoolExecutor(1) as pool:  # read the next range while compacting this one
            reads = [pool.submit(read_leveled, g, url, lp, *todo[0])] if todo else []
            for i, (a, b) in enumerate(todo):
                levels = reads[i].result()
                reads[i] = None
                if i + 1 < len(todo):
                    reads.append(pool.submit(read_leveled, g, url, lp, *todo[i + 1]))
                rt = compact(levels, prefix_len[a:b], sizes[a:b], D)
                del levels
                path = os.path.join(work, f"{i:06d}.npz")
                np.savez(path, **{f: getattr(rt, f) for f in _RADIX_FIELDS})
                staged.append(path)
                R, E, C = R + rt.n_nodes, E + len(rt.edge_tokens), C + len(rt.count_value)
                _say(progress, f"compacted partitions {a}..{b - 1} ({i + 1}/{len(todo)})")

        def pieces() -> Iterator[RadixTrie]:
            for path in staged:
                with np.load(path, allow_pickle=False) as z:
                    yield RadixTrie(*(z[f] for f in _RADIX_FIELDS))

        writer = TrieWriter(url, store.corpus, dict(store.meta["build"]))
        totals = writer.write_radix(pieces(), {"nodes": R, "edge_tokens": E, "counts": C})
        writer.finish()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    secs = time.perf_counter() - t0
    _say(progress, f"radix layer compacted from the leveled layer in {secs:.2f} s")
    return {"store": url, "layer": "radix", "source": "leveled", "seconds": secs,
            "partitions": store.n_partitions, **totals}


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[agpt build] {msg}", file=sys.stderr, flush=True)
