"""`agpt verify`: check a trie store against its own corpus, independently of the builder.

Checks (SPEC §6 diagnostics), each reported as one `CheckResult`:

    partitions     the partition table and the spine: sorted, disjoint prefixes; the spine is
                   exactly the root and the proper prefixes of the partition roots
    structure      per layer: parents in range and one depth up, partition ranges contiguous
                   and covering every node, lexicographic order within each depth, counts
                   sorted and positive, radix edges contiguous and in canonical places, totals
    radix-leveled  per partition, expanding the radix layer gives the leveled layer exactly
    coverage       every start position's k-prefix, for every k, is a node with its mass:
                   rolling 64-bit polynomial path hashes of the corpus (document-aware) against
                   the trie's path hashes (parent * B + token + 1), spine included
    conservation   sum of counts == mass; each child's mass == its parent's count for it minus
                   the occurrences that end at a document end there (matched exactly against
                   the corpus); per-depth total mass and terminal excess from document lengths
    pruning        (pruned stores) kept nodes have mass >= min_mass, dropped ones < min_mass

Memory is bounded: the corpus is hashed in token chunks and the trie is read a range of
partitions at a time. The multisets are compared through a linear fingerprint
sum(mass * mix(hash)) mod 2**64 per depth, which needs one pass on each side; unequal
multisets agree with probability ~2**-64. Nodes that end at a document end (mass 0 or
terminal occurrences) are few and are matched hash by hash.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agpt.errors import AgptError
from agpt.store.format import read_array
from agpt.trie.compact import batches, find_entries, read_leveled
from agpt.trie.radix import LeveledDepth, RadixTrie, expand, ranges

#: polynomial base of the path hashes (odd, so multiplication is a bijection mod 2**64)
BASE = np.uint64(0x9E3779B97F4A7C15)
_M64 = (1 << 64) - 1
_RADIX_FIELDS = ("parent", "head", "mass", "edge_ptr", "edge_tokens", "count_ptr",
                 "count_token", "count_value", "part_ptr")
_LEVEL_FIELDS = ("token", "parent", "mass", "count_ptr", "count_token", "count_value", "part_ptr")
CHECKS = ("partitions", "structure", "radix-leveled", "coverage", "conservation", "pruning")


@dataclass
class CheckResult:
    """One check's verdict: `ok name: detail` or `FAIL name: detail`."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok' if self.ok else 'FAIL'} {self.name}: {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


def mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: spreads path hashes so that linear fingerprints are sound."""
    z = h + np.uint64(0x632BE59BD9B4E019)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _usum(x: np.ndarray) -> int:
    """Sum mod 2**64 (NumPy's uint64 sum wraps around)."""
    return int(np.sum(x, dtype=np.uint64)) if len(x) else 0


def _ids(x: np.ndarray, limit: int = 3) -> str:
    return ", ".join(str(int(i)) for i in x[:limit]) + (" ..." if len(x) > limit else "")


@dataclass
class _Problems:
    n: int = 0
    first: list[str] = field(default_factory=list)

    def add(self, msg: str, count: int = 1) -> None:
        if count <= 0:
            return
        self.n += count
        if len(self.first) < 3:
            self.first.append(msg)


# ---------------------------------------------------------------------------------------------
# The corpus side
# ---------------------------------------------------------------------------------------------

@dataclass
class CorpusSide:
    """Per depth k: fingerprint of the k-prefixes of the starts with a successor after them,
    and the hashes (with multiplicity) of the k-prefixes that end exactly at a document end."""

    F: list[int]                         # F[k], k = 0..D+1 (F[0] unused)
    term_hash: list[np.ndarray]          # sorted unique hashes, k = 0..D+1
    term_mult: list[np.ndarray]
    mass_total: np.ndarray               # (D+1,) starts with a successor after k tokens
    term_docs: np.ndarray                # (D+1,) documents long enough to end a k-gram
    n_docs: int

    def term(self, k: int, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(multiplicity, index into term_hash[k] or -1) of each hash among depth-k ends."""
        th = self.term_hash[k] if k < len(self.term_hash) else np.zeros(0, np.uint64)
        if len(th) == 0 or len(h) == 0:
            return np.zeros(len(h), np.int64), np.full(len(h), -1, np.int64)
        j = np.minimum(np.searchsorted(th, h), len(th) - 1)
        hit = th[j] == h
        return (np.where(hit, self.term_mult[k][j], 0).astype(np.int64), np.where(hit, j, -1))

    def counts_fp(self, k: int) -> int:
        """Fingerprint of the (k+1)-grams of the starts with a successor after k tokens."""
        th = self.term_hash[k + 1]
        return (self.F[k + 1] + _usum(mix(th) * self.term_mult[k + 1].astype(np.uint64))) & _M64


def _hash_pass(corpus: Any, D: int, k0: int, visit: Callable[[int, np.ndarray, np.ndarray], None],
               chunk: int = 1 << 20) -> None:
    """visit(k, h, rem) for k = 1..D+1, token chunk by token chunk: h = hashes of the k-prefixes
    of the chunk's starts (garbage where rem < k), rem = tokens left in each start's document.
    Depths below k0 are hashed but not visited."""
    docs = corpus.train_documents()
    ds, de = docs[:, 0], docs[:, 1]
    nd = len(docs)
    end = corpus.train_end
    for lo in range(0, end if nd else 0, chunk):
        hi = min(lo + chunk, end)
        toks = corpus.tokens(lo, min(hi + D + 1, end))
        pos = np.arange(lo, hi, dtype=np.int64)
        d = np.minimum(np.searchsorted(de, pos, side="right"), nd - 1)
        rem = de[d] - pos
        ok = (ds[d] <= pos) & (rem >= 2)
        pos, rem = pos[ok], rem[ok]
        padded = np.zeros(hi - lo + D + 2, dtype=np.uint64)
        padded[: len(toks)] = toks.astype(np.uint64) + np.uint64(1)
        rel = pos - lo
        h = np.zeros(len(pos), dtype=np.uint64)
        for k in range(1, D + 2):
            h = h * BASE + padded[rel + (k - 1)]
            if k >= k0:
                visit(k, h, rem)


def corpus_side(corpus: Any, D: int) -> CorpusSide:
    """Fingerprints and document-end hashes of every start's prefixes of length 1..D+1."""
    F = [0] * (D + 2)
    terms: list[list[np.ndarray]] = [[] for _ in range(D + 2)]

    def visit(k: int, h: np.ndarray, rem: np.ndarray) -> None:
        near = np.flatnonzero(rem <= k)  # the few starts whose k-prefix reaches a doc end
        m = mix(h)
        # starts with a successor after k tokens: all but those with rem <= k
        F[k] = (F[k] + _usum(m) - _usum(m[near])) & _M64
        if k >= 2:
            terms[k].append(h[near[rem[near] == k]])

    _hash_pass(corpus, D, 1, visit)
    th, tm = [], []
    for k in range(D + 2):
        u, c = np.unique(np.concatenate(terms[k]) if terms[k] else np.zeros(0, np.uint64),
                         return_counts=True)
        th.append(u.astype(np.uint64))
        tm.append(c.astype(np.int64))
    docs = corpus.train_documents()
    lens = np.sort(docs[:, 1] - docs[:, 0])
    suffix = np.concatenate((np.cumsum(lens[::-1])[::-1], [0]))
    ks = np.arange(D + 1)
    k1 = np.maximum(ks, 1)
    i = np.searchsorted(lens, k1, side="right")          # documents longer than k
    mass_total = suffix[i] - k1 * (len(lens) - i)
    term_docs = np.where(ks >= 2, len(lens) - np.searchsorted(lens, ks, side="left"), 0)
    return CorpusSide(F, th, tm, mass_total.astype(np.int64), term_docs.astype(np.int64),
                      len(lens))


def corpus_counts(corpus: Any, D: int, queries: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Occurrences in the corpus (starts i with i+k <= doc end) of each k-gram hash queried.

    queries[k] are sorted unique hashes; memory is theirs plus one token chunk.
    """
    out = {k: np.zeros(len(q), np.int64) for k, q in queries.items()}
    if not queries:
        return out

    def visit(k: int, h: np.ndarray, rem: np.ndarray) -> None:
        q = queries.get(k)
        if q is None or len(q) == 0:
            return
        j = np.minimum(np.searchsorted(q, h), len(q) - 1)
        hit = (q[j] == h) & (rem >= k)
        out[k] += np.bincount(j[hit], minlength=len(q))

    _hash_pass(corpus, D, min(queries), visit)
    return out


# ---------------------------------------------------------------------------------------------
# The verifier
# ---------------------------------------------------------------------------------------------

class _Verifier:
    def __init__(self, store: Any, batch_nodes: int, progress: bool):
        self.s = store
        self.url = store.url
        self.g = store.group
        self.batch_nodes = batch_nodes
        self.progress = progress
        self.D = store.max_depth
        self.V = store.vocab_size
        build = store.meta.get("build", {}) or {}
        self.min_mass = int(build.get("prune_min_mass") or 0)
        self.min_depth = int(build.get("prune_min_depth") or 0) if self.min_mass > 0 else self.D + 2
        self.pruned = self.min_mass > 0
        self.p = {c: _Problems() for c in CHECKS}
        self.ran = {c: False for c in CHECKS}
        self.facts: dict[str, str] = {}
        D = self.D
        self.fp_mass = [0] * (D + 1)
        self.fp_counts = [0] * (D + 1)
        self.nodes = np.zeros(D + 1, np.int64)
        self.mass_total = np.zeros(D + 1, np.int64)
        self.excess = np.zeros(D + 1, np.int64)
        self.queries: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}

    def say(self, msg: str) -> None:
        if self.progress:
            print(f"[agpt verify] {msg}", file=sys.stderr, flush=True)

    # -- driver -------------------------------------------------------------------------------
    def run(self) -> None:
        s = self.s
        self.layers = s.layers
        if not self.layers:
            self.p["structure"].add("the store has no complete layer (run agpt build-radix or build-index)")
        t = time.perf_counter()
        self.cs = corpus_side(s.corpus, self.D)
        self.found = [np.zeros(len(h), bool) for h in self.cs.term_hash]
        self.say(f"corpus hashed in {time.perf_counter() - t:.1f} s")
        if not self.check_partitions():
            return
        self.check_spine()
        lv, rx = "leveled" in self.layers, "radix" in self.layers
        if lv:
            part_nodes = (self.lp[:, 1:] - self.lp[:, :-1]).sum(axis=0)
        elif rx:
            eptr = self.g["radix/edge_ptr"]
            try:
                part_nodes = np.diff(np.asarray(eptr.oindex[self.rp]))
            except Exception as e:  # noqa: BLE001  (codec errors on damaged chunks)
                raise AgptError(f"{self.url}: array 'radix/edge_ptr' is corrupt ({e})") from e
        else:
            return
        todo = batches(part_nodes, self.batch_nodes)

        def read(a: int, b: int) -> tuple[list[LeveledDepth] | None, RadixTrie | None]:
            return (read_leveled(self.g, self.url, self.lp, a, b) if lv else None,
                    self.s.radix_partitions(a, b) if rx else None)

        with ThreadPoolExecutor(1) as pool:  # read the next range while checking this one
            ahead = pool.submit(read, *todo[0]) if todo else None
            for i, (a, b) in enumerate(todo):
                levels, rt = ahead.result()
                ahead = pool.submit(read, *todo[i + 1]) if i + 1 < len(todo) else None
                if rt is not None:
                    ex = self.check_radix(rt, a, b, levels)
                    if levels is None:
                        levels = ex
                del rt
                if levels is not None:
                    self.check_levels(levels, a, b)
                del levels
                self.say(f"partitions {a}..{b - 1} checked ({i + 1}/{len(todo)})")
        self.ran.update({"structure": True, "coverage": True, "conservation": True,
                         "pruning": self.pruned, "radix-leveled": lv and rx})
        self.finish()

    # -- partition table and spine ----------------------------------------------------------
    def check_partitions(self) -> bool:
        pr = self.p["partitions"]
        self.ran["partitions"] = True
        s, D, V = self.s, self.D, self.V
        sp = s.spine()
        self.sp = sp
        S = len(sp.depth)
        if any(len(x) != S for x in (sp.token, sp.parent, sp.mass)) or len(sp.count_ptr) != S + 1 \
                or sp.count_ptr[0] != 0 or np.any(np.diff(sp.count_ptr) < 0) \
                or sp.count_ptr[-1] != len(sp.count_token) or len(sp.count_value) != len(sp.count_token):
            pr.add("spine arrays disagree in length or its count pointers are not monotone")
            return False
        ptr = read_array(self.g, "partitions/prefix_ptr", self.url).astype(np.int64)
        ptok = read_array(self.g, "partitions/prefix_tokens", self.url).astype(np.int64)
        if len(ptr) == 0 or ptr[0] != 0 or np.any(np.diff(ptr) < 1) or ptr[-1] != len(ptok):
            pr.add("partition prefix pointers are not increasing over the prefix tokens")
            return False
        self.prefixes = prefixes = [tuple(ptok[ptr[i]: ptr[i + 1]].tolist()) for i in range(len(ptr) - 1)]
        P = len(prefixes)
        self.spp = spp = s.spine_parent_of_partition().astype(np.int64)
        self.sizes = s.partition_sizes.astype(np.int64)
        self.plen = np.array([len(x) for x in prefixes], dtype=np.int64)
        self.last = np.array([x[-1] for x in prefixes], dtype=np.int64)
        if S == 0 or sp.depth[0] != 0 or sp.parent[0] != -1 or sp.token[0] != 0:
            pr.add("spine node 0 is not the root")
            return False
        if len(spp) != P or len(self.sizes) != P:
            pr.add(f"partition table lengths disagree ({P} prefixes, {len(spp)} spine parents, "
                   f"{len(self.sizes)} sizes)")
            return False
        if s.meta.get("partitions", {}).get("count") not in (None, P):
            pr.add(f"attributes say {s.meta['partitions']['count']} partitions, the table has {P}")
        par = sp.parent.astype(np.int64)
        bad = np.flatnonzero((par[1:] < 0) | (par[1:] >= np.arange(1, S)))
        if bad.size:
            pr.add(f"spine nodes {_ids(bad + 1)} have parents out of range", len(bad))
            return False
        paths: list[tuple[int, ...]] = [()]
        for i in range(1, S):
            paths.append(paths[par[i]] + (int(sp.token[i]),))
        if any(sp.depth[i] != len(paths[i]) for i in range(S)):
            pr.add("spine depths disagree with the spine's parent links")
        if any(paths[i] >= paths[i + 1] for i in range(S - 1)):
            pr.add("spine nodes are not in lexicographic order")
        if any(prefixes[i] >= prefixes[i + 1] for i in range(P - 1)):
            pr.add("partition prefixes are not sorted and distinct")
        if any(t < 0 or t >= V for x in prefixes for t in x) or np.any(sp.token >= V):
            pr.add(f"a prefix or spine token is outside the vocabulary (V = {V})")
        for i in range(P - 1):
            if prefixes[i + 1][: len(prefixes[i])] == prefixes[i]:
                pr.add(f"partition prefix {prefixes[i]} is a prefix of {prefixes[i + 1]}")
                break
        index = {p: i for i, p in enumerate(paths)}
        want = {()} | {x[:j] for x in prefixes for j in range(len(x))}
        if set(paths) != want:
            pr.add(f"the spine holds {len(paths)} prefixes; the partitions need exactly "
                   f"{len(want)} (the root and every proper prefix of a partition root)")
        if any(x in index for x in prefixes):
            pr.add("a partition root is also a spine node")
        exp_spp = np.array([index.get(x[:-1], -1) for x in prefixes], dtype=np.int64)
        bad = np.flatnonzero(exp_spp != spp)
        if bad.size:
            pr.add(f"partitions {_ids(bad)} have the wrong spine parent", len(bad))
            return False
        # spine counts: a partition's size is its root's count in its spine parent
        rc = self._spine_count(spp, self.last)
        bad = np.flatnonzero(rc[0] != self.sizes)
        if bad.size:
            pr.add(f"partitions {_ids(bad)}: size differs from the spine's count of the root", len(bad))
        self.spine_paths = paths
        # layer tables
        if "leveled" in self.layers:
            lp = read_array(self.g, "partitions/leveled_ptr", self.url).astype(np.int64)
            N = self.g["leveled/token"].shape[0]
            if lp.shape != (D, P + 1) or np.any(np.diff(lp, axis=1) < 0) or lp[0, 0] != 0 \
                    or np.any(lp[1:, 0] != lp[:-1, -1]) or lp[-1, -1] != N:
                pr.add(f"leveled partition ranges (shape {lp.shape}) are not contiguous over "
                       f"the {N} nodes, depth after depth")
                return False
            self.lp = lp
        if "radix" in self.layers:
            rp = read_array(self.g, "partitions/radix_ptr", self.url).astype(np.int64)
            R = self.g["radix/parent"].shape[0]
            if rp.shape != (P + 1,) or np.any(np.diff(rp) < 0) or rp[0] != 0 or rp[-1] != R:
                pr.add(f"radix partition ranges are not contiguous over the {R} nodes")
                return False
            self.rp = rp
        self.facts["partitions"] = (f"{P} {s.meta.get('partitions', {}).get('scheme', '?')} "
                                    f"partitions, {S} spine nodes")
        return True

    def _spine_count(self, owner: np.ndarray, token: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sp = self.sp
        j = find_entries(sp.count_ptr, sp.count_token, owner, token)
        val = np.zeros(len(owner), np.int64)
        val[j >= 0] = sp.count_value[j[j >= 0]]
        return val, j

    def check_spine(self) -> None:
        sp = self.sp
        S = len(sp.depth)
        self.spine_has_child = np.zeros(len(sp.count_value), bool)
        h = np.zeros(S, np.uint64)
        depth = sp.depth.astype(np.int64)
        for d in range(1, int(depth.max(initial=0)) + 1):
            sel = np.flatnonzero(depth == d)
            h[sel] = h[sp.parent[sel]] * BASE + sp.token[sel].astype(np.uint64) + np.uint64(1)
        self.spine_hash = h
        self._check_counts("spine", sp.count_ptr, sp.count_token, sp.count_value, sp.mass)
        nr = np.arange(1, S)
        pc, j = self._spine_count(sp.parent[nr].astype(np.int64), sp.token[nr].astype(np.int64))
        self.spine_has_child[j[j >= 0]] = True
        self._node_rules("spine", depth[nr], h[nr], sp.mass[nr].astype(np.int64), pc, spine=True)
        # the root and every spine node feed the per-depth totals and fingerprints
        for d in range(0, int(depth.max(initial=0)) + 1):
            sel = np.flatnonzero(depth == d)
            self._accumulate(d, h[sel], sp.mass[sel].astype(np.int64), sp.count_ptr,
                             sp.count_token, sp.count_value, sel)

    # -- per-node rules shared by the spine and the layers ------------------------------------
    def _check_counts(self, where: str, ptr: np.ndarray, tok: np.ndarray, val: np.ndarray,
                      mass: np.ndarray) -> bool:
        st, co = self.p["structure"], self.p["conservation"]
        n = len(ptr) - 1
        if ptr[0] != 0 or np.any(np.diff(ptr) < 0) or ptr[-1] != len(tok) or len(val) != len(tok):
            st.add(f"{where}: count pointers are not monotone over the count entries")
            return False
        bad = np.flatnonzero(tok >= self.V)
        st.add(f"{where}: count tokens {_ids(tok[bad])} outside the vocabulary", len(bad))
        bad = np.flatnonzero(val <= 0)
        st.add(f"{where}: {len(bad)} count entries are <= 0", len(bad))
        own = np.repeat(np.arange(n), np.diff(ptr))
        if len(tok) > 1:
            same = own[1:] == own[:-1]
            bad = np.flatnonzero(same & (tok[1:].astype(np.int64) <= tok[:-1].astype(np.int64)))
            st.add(f"{where}: count tokens of nodes {_ids(own[bad])} are not strictly increasing",
                   len(bad))
        c = np.concatenate(([0], np.cumsum(val, dtype=np.int64)))
        sums = c[ptr[1:]] - c[ptr[:-1]]
        bad = np.flatnonzero(sums != mass)
        co.add(f"{where}: nodes {_ids(bad)} have counts summing to {_ids(sums[bad])} but mass "
               f"{_ids(mass[bad])}", len(bad))
        return True

    def _node_rules(self, where: str, depth: np.ndarray, h: np.ndarray, mass: np.ndarray,
                    pc: np.ndarray, spine: bool = False) -> None:
        """Child mass == parent count - terminal occurrences (matched against the corpus)."""
        co, pr = self.p["conservation"], self.p["pruning"]
        term = np.zeros(len(h), np.int64)
        for d in np.unique(depth):
            sel = np.flatnonzero(depth == d)
            m, j = self.cs.term(int(d), h[sel])
            term[sel] = m
            self.found[int(d)][j[j >= 0]] = True
        bad = np.flatnonzero(pc <= 0)
        co.add(f"{where}: {len(bad)} nodes (depths {_ids(np.unique(depth[bad]))}) are not in "
               "their parent's counts", len(bad))
        bad = np.flatnonzero((pc > 0) & (pc != mass + term))
        co.add(f"{where}: {len(bad)} nodes (depths {_ids(np.unique(depth[bad]))}) have mass "
               f"{_ids(mass[bad])} but their parent counts {_ids(pc[bad])} with "
               f"{_ids(term[bad])} document-end occurrences", len(bad))
        self.excess += np.bincount(depth, weights=pc - mass, minlength=self.D + 1).astype(np.int64)
        if self.pruned and not spine:
            bad = np.flatnonzero((depth >= self.min_depth) & (mass < self.min_mass))
            pr.add(f"{where}: {len(bad)} kept nodes at depth >= {self.min_depth} have mass < "
                   f"{self.min_mass}", len(bad))

    def _accumulate(self, d: int, h: np.ndarray, mass: np.ndarray, ptr: np.ndarray,
                    tok: np.ndarray, val: np.ndarray, sel: np.ndarray | None = None) -> None:
        """Add depth-d nodes to the fingerprints: sum mass*mix(h), sum n(p,x)*mix(h(px))."""
        self.nodes[d] += len(h)
        self.mass_total[d] += int(mass.sum())
        self.fp_mass[d] = (self.fp_mass[d] + _usum(mix(h) * mass.astype(np.uint64))) & _M64
        own = np.arange(len(ptr) - 1) if sel is None else sel
        ne = np.diff(ptr)[own]
        ent = ranges(ptr[:-1][own], ne)
        hh = np.repeat(h, ne) * BASE + tok[ent].astype(np.uint64) + np.uint64(1)
        self.fp_counts[d] = (self.fp_counts[d] + _usum(mix(hh) * val[ent].astype(np.uint64))) & _M64
        if self.pruned and d >= self.min_depth - 1:  # checked one by one (see finish)
            self.queries.setdefault(d + 1, []).append((hh, val[ent].astype(np.int64)))

    # -- one range of partitions of the leveled trie -----------------------------------------
    def check_levels(self, levels: list[LeveledDepth], a: int, b: int) -> None:
        st = self.p["structure"]
        D, V = self.D, self.V
        P = b - a
        plen, last, spp = self.plen[a:b], self.last[a:b], self.spp[a:b]
        hprev = np.zeros(0, np.uint64)
        prev: LeveledDepth | None = None
        prev_has_child = np.zeros(0, bool)
        for k in range(1, D + 1):
            L = levels[k - 1]
            n = L.n_nodes
            where = f"partitions {a}..{b - 1} depth {k}"
            pp = L.part_ptr.astype(np.int64)
            if len(pp) != P + 1 or pp[0] != 0 or pp[-1] != n or np.any(np.diff(pp) < 0) \
                    or len(L.parent) != n or len(L.mass) != n or len(L.count_ptr) != n + 1:
                st.add(f"{where}: node arrays and partition ranges disagree")
                return
            cnt = np.diff(pp)
            bad = np.flatnonzero((plen > k) & (cnt > 0))
            st.add(f"{where}: partitions {_ids(bad + a)} have nodes above their root", len(bad))
            bad = np.flatnonzero((plen == k) & (cnt != 1) & ~((cnt == 0) & self.pruned))
            st.add(f"{where}: partitions {_ids(bad + a)} have {_ids(cnt[bad])} root nodes", len(bad))
            pid = np.repeat(np.arange(P), cnt)
            par = L.parent.astype(np.int64)
            root = par < 0
            bad = np.flatnonzero(root != (plen[pid] == k))
            st.add(f"{where}: nodes {_ids(bad)} are partition roots at the wrong depth or "
                   "non-roots without a parent", len(bad))
            root &= plen[pid] == k
            nr = ~root
            bad = np.flatnonzero(root & (L.token.astype(np.int64) != last[pid]))
            st.add(f"{where}: roots {_ids(bad)} do not carry their prefix's last token", len(bad))
            bad = np.flatnonzero(L.token >= V)
            st.add(f"{where}: tokens {_ids(L.token[bad])} outside the vocabulary", len(bad))
            bad = np.flatnonzero(L.mass < 0)
            st.add(f"{where}: negative masses", len(bad))
            if prev is not None:
                lo = prev.part_ptr[pid]
                hi = prev.part_ptr[pid + 1]
                bad = np.flatnonzero(nr & ((par < lo) | (par >= hi)))
            else:
                bad = np.flatnonzero(nr)
            if bad.size:
                st.add(f"{where}: nodes {_ids(bad)} have parents outside their partition's "
                       "previous depth", len(bad))
                return
            key = par[nr] * (V + 1) + L.token[nr].astype(np.int64)
            bad = np.flatnonzero(key[1:] <= key[:-1])
            st.add(f"{where}: nodes are not in lexicographic order (strictly increasing "
                   f"(parent, token)) at {len(bad)} places", len(bad))
            if not self._check_counts(where, L.count_ptr, L.count_token, L.count_value, L.mass):
                return
            # path hashes
            h = np.empty(n, np.uint64)
            h[root] = self.spine_hash[spp[pid[root]]]
            h[nr] = hprev[par[nr]]
            h = h * BASE + L.token.astype(np.uint64) + np.uint64(1)
            # parent counts: from the previous depth, or from the spine for roots
            pc = np.zeros(n, np.int64)
            if prev is not None and nr.any():
                j = find_entries(prev.count_ptr, prev.count_token, par[nr], L.token[nr])
                pc[nr] = np.where(j >= 0, prev.count_value[np.maximum(j, 0)], 0) \
                    if len(prev.count_value) else 0
                prev_has_child[j[j >= 0]] = True
            if root.any():
                v, j = self._spine_count(spp[pid[root]], L.token[root].astype(np.int64))
                pc[root] = v
                self.spine_has_child[j[j >= 0]] = True
            if prev is not None:
                self._childless(prev, hprev, prev_has_child, k, where)
            self._node_rules(where, np.full(n, k), h, L.mass.astype(np.int64), pc)
            self._accumulate(k, h, L.mass.astype(np.int64), L.count_ptr, L.count_token,
                             L.count_value)
            prev, hprev = L, h
            prev_has_child = np.zeros(len(L.count_value), bool)

    def _childless(self, prev: LeveledDepth, hprev: np.ndarray, has_child: np.ndarray, k: int,
                   where: str) -> None:
        """Count entries of depth k-1 with no depth-k node: pruned (checked) or missing."""
        miss = np.flatnonzero(~has_child)
        if miss.size == 0:
            return
        own = np.repeat(np.arange(prev.n_nodes), np.diff(prev.count_ptr))[miss]
        hc = hprev[own] * BASE + prev.count_token[miss].astype(np.uint64) + np.uint64(1)
        self._dropped(k, hc, prev.count_value[miss].astype(np.int64), where)

    def _dropped(self, k: int, hc: np.ndarray, count: np.ndarray, where: str) -> None:
        if not self.pruned:
            self.p["coverage"].add(f"{where}: {len(hc)} next-token counts have no node at "
                                   f"depth {k}", len(hc))
            return
        term, _ = self.cs.term(k, hc)
        child_mass = count - term
        bad = np.flatnonzero((k < self.min_depth) | (child_mass >= self.min_mass))
        self.p["pruning"].add(f"{where}: {len(bad)} dropped nodes at depth {k} had mass "
                              f"{_ids(child_mass[bad])} (min_mass {self.min_mass}, min_depth "
                              f"{self.min_depth})", len(bad))

    # -- one range of partitions of the radix trie -----------------------------------------
    def check_radix(self, rt: RadixTrie, a: int, b: int,
                    levels: list[LeveledDepth] | None) -> list[LeveledDepth] | None:
        st = self.p["structure"]
        st0 = st.n
        D, V = self.D, self.V
        where = f"radix partitions {a}..{b - 1}"
        R = rt.n_nodes
        pp = rt.part_ptr.astype(np.int64)
        eptr, cptr = rt.edge_ptr.astype(np.int64), rt.count_ptr.astype(np.int64)
        if eptr[0] != 0 or np.any(np.diff(eptr) < 1) or eptr[-1] != len(rt.edge_tokens):
            st.add(f"{where}: edges are empty or edge pointers are not increasing")
            return None
        if cptr[0] != 0 or np.any(np.diff(cptr) < 0) or cptr[-1] != len(rt.count_value):
            st.add(f"{where}: count pointers are not monotone")
            return None
        pid = np.repeat(np.arange(b - a), np.diff(pp))
        par = rt.parent.astype(np.int64)
        first = np.zeros(R, bool)
        first[pp[:-1][np.diff(pp) > 0]] = True
        idx = np.arange(R)
        bad = np.flatnonzero((par < 0) != first)
        st.add(f"{where}: nodes {_ids(bad)}: a partition's first node must be its only root",
               len(bad))
        bad = np.flatnonzero(~first & ((par < pp[pid]) | (par >= idx)))
        if bad.size:
            st.add(f"{where}: nodes {_ids(bad)} have parents outside the partition or after "
                   "them (not depth-first preorder)", len(bad))
            return None
        elen = np.diff(eptr)
        head = rt.head.astype(np.int64)
        end = head + elen - 1
        exp_head = np.where(first, self.plen[a:b][pid], end[np.maximum(par, 0)] + 1)
        bad = np.flatnonzero(head != exp_head)
        st.add(f"{where}: nodes {_ids(bad)} start at depth {_ids(head[bad])}, not "
               f"{_ids(exp_head[bad])} (root depth or parent's end + 1)", len(bad))
        bad = np.flatnonzero(end > D)
        st.add(f"{where}: edges of nodes {_ids(bad)} run past depth {D}", len(bad))
        bad = np.flatnonzero(first & (rt.edge_tokens[eptr[:-1]].astype(np.int64)
                                      != self.last[a:b][pid]))
        st.add(f"{where}: roots {_ids(bad)} do not start with their prefix's last token", len(bad))
        bad = np.flatnonzero(rt.edge_tokens >= V)
        st.add(f"{where}: {len(bad)} edge tokens outside the vocabulary", len(bad))
        self._check_counts(where, cptr, rt.count_token, rt.count_value, rt.end_mass)
        em = rt.end_mass
        bad = np.flatnonzero(((elen == 1) & (rt.mass != em)) | ((elen > 1) & ((rt.mass < em)
                                                                          | (rt.mass < 1))))
        self.p["conservation"].add(f"{where}: nodes {_ids(bad)}: head mass {_ids(rt.mass[bad])} "
                                   f"vs endpoint counts {_ids(em[bad])} (equal on one-token "
                                   "edges, never larger at the endpoint)", len(bad))
        if st.n > st0:
            return None
        ex = expand(rt, D)
        if levels is not None:
            rl = self.p["radix-leveled"]
            for k, (x, y) in enumerate(zip(ex, levels, strict=True), 1):
                for f in _LEVEL_FIELDS:
                    u, v = getattr(x, f), getattr(y, f)
                    if len(u) != len(v) or not np.array_equal(u, v):
                        rl.add(f"partitions {a}..{b - 1} depth {k}: expanded radix {f} differs "
                               "from the leveled layer")
                        break
        # canonical edges (what `compact` would produce): a head on a longer edge is not
        # terminal; an edge ends exactly at depth D, a branch, a stop, or a count drop
        ne = np.diff(cptr)
        pc = np.zeros(R, np.int64)
        nf = np.flatnonzero(~first)
        ft = rt.edge_tokens[eptr[:-1]]
        j = find_entries(cptr, rt.count_token, par[nf], ft[nf])
        pc[nf] = np.where(j >= 0, rt.count_value[np.maximum(j, 0)], 0) if len(j) and \
            len(rt.count_value) else 0
        pc[first] = self.sizes[a:b][pid[first]]
        kids = np.bincount(par[nf], minlength=R)
        term_end = np.where(elen > 1, em < rt.mass, pc > rt.mass)
        bad = np.flatnonzero((elen > 1) & (pc != rt.mass))
        bad = np.union1d(bad, np.flatnonzero(~((end == D) | (ne != 1) | (kids == 0) | term_end)))
        st.add(f"{where}: nodes {_ids(bad)} are not canonical (an edge must end exactly where "
               "the trie branches, stops, or a count drops)", len(bad))
        return ex

    # -- totals and fingerprints -------------------------------------------------------------
    def finish(self) -> None:
        cs, D = self.cs, self.D
        cov, co, st = (self.p[c] for c in ("coverage", "conservation", "structure"))
        # spine entries with no child (no spine node, no partition root)
        sp = self.sp
        miss = np.flatnonzero(~self.spine_has_child)
        if miss.size:
            own = np.repeat(np.arange(len(sp.depth)), np.diff(sp.count_ptr))[miss]
            hc = self.spine_hash[own] * BASE + sp.count_token[miss].astype(np.uint64) + np.uint64(1)
            for d in np.unique(sp.depth[own]):
                sel = sp.depth[own] == d
                self._dropped(int(d) + 1, hc[sel], sp.count_value[miss][sel].astype(np.int64),
                              "spine")
        full = min(D, self.min_depth - 1)  # depths checked against the corpus in full
        if self.pruned:
            self.check_counts_exactly()
        for k in range(0, full + 1):
            if k >= 1 and self.fp_mass[k] != cs.F[k]:
                cov.add(f"depth {k}: the nodes' masses differ from the corpus's {k}-grams "
                        "(path-hash fingerprint)")
            if self.fp_counts[k] != cs.counts_fp(k):
                cov.add(f"depth {k}: the next-token counts differ from the corpus's "
                        f"{k + 1}-grams (path-hash fingerprint)")
            if k >= 1 and not self.found[k].all():
                m = int((~self.found[k]).sum())
                cov.add(f"depth {k}: {m} {k}-grams that end a document are not nodes", m)
            if self.mass_total[k] != cs.mass_total[k]:
                co.add(f"depth {k}: total mass {self.mass_total[k]} != {cs.mass_total[k]} "
                       "start positions with a successor")
            if k >= 1 and self.excess[k] != cs.term_docs[k]:
                co.add(f"depth {k}: parents' counts exceed children's masses by "
                       f"{self.excess[k]}, expected {cs.term_docs[k]} (documents that end a "
                       f"{k}-gram)")
        tot = self.s.totals()
        n_lev = int(self.nodes.sum())
        if "leveled" in self.layers:
            if tot.get("leveled_nodes") not in (None, n_lev):
                st.add(f"attributes say {tot['leveled_nodes']} leveled nodes, found {n_lev}")
            per = tot.get("leveled_per_depth")
            if per is not None and list(per) != self.nodes[1:].tolist():
                st.add("attributes' nodes per depth disagree with the layer")
        if "radix" in self.layers:
            R = self.g["radix/parent"].shape[0]
            if tot.get("radix_nodes") not in (None, R):
                st.add(f"attributes say {tot['radix_nodes']} radix nodes, the layer has {R}")
            E = self.g["radix/edge_tokens"].shape[0]
            if E != n_lev - len(sp.depth):
                st.add(f"radix edges hold {E} tokens, the trie has {n_lev - len(sp.depth)} "
                       "non-spine nodes")
        layers = " + ".join(self.layers)
        self.facts["structure"] = f"{layers}; {n_lev:,} nodes incl. the root" + (
            f", {self.g['radix/parent'].shape[0]:,} radix nodes" if "radix" in self.layers else "")
        self.facts["coverage"] = (f"depths 1..{full}: every start's k-prefix is a node with its "
                                  f"mass and counts ({cs.n_docs} document(s))")
        if self.pruned:
            self.facts["coverage"] = (
                (f"depths 1..{full}: every start's k-prefix is a node with its mass; " if full >= 1
                 else "") + f"kept nodes' next-token counts at depths {max(self.min_depth - 1, 0)}"
                f"..{D} match the corpus one by one ({cs.n_docs} document(s))")
        self.facts["conservation"] = "counts sum to masses; child masses = parent counts less " \
            "document-end occurrences; per-depth totals match"
        self.facts["radix-leveled"] = f"{len(self.prefixes)} partitions expand exactly"
        if self.pruned:
            self.facts["pruning"] = (f"kept nodes have mass >= {self.min_mass}, dropped ones < "
                                     f"{self.min_mass} (depth >= {self.min_depth})")

    def check_counts_exactly(self) -> None:
        """Pruned depths: every kept node's next-token counts against the corpus, one by one.

        Fingerprints cannot see past the cut (the corpus side would need the dropped nodes), so
        the (k+1)-gram of each count entry at depth >= min_depth-1 is looked up in a second
        corpus pass. With these counts exact, kept masses (parent count - document ends) and
        dropped masses (count - document ends < min_mass) are exact too.
        """
        q, claimed = {}, {}
        for k, parts in self.queries.items():
            h = np.concatenate([x for x, _ in parts])
            c = np.concatenate([y for _, y in parts])
            u, inv = np.unique(h, return_inverse=True)
            q[k], claimed[k] = u, np.bincount(inv, weights=c, minlength=len(u)).astype(np.int64)
        self.queries = {}
        real = corpus_counts(self.s.corpus, self.D, q)
        for k in sorted(q):
            bad = np.flatnonzero(real[k] != claimed[k])
            self.p["coverage"].add(f"depth {k - 1}: {len(bad)} next-token counts differ from the "
                                   f"corpus ({_ids(claimed[k][bad])} stored, {_ids(real[k][bad])} "
                                   "in the corpus)", len(bad))

    def results(self, error: str | None) -> list[CheckResult]:
        """One result per check that ran or failed; checks cut short by damage are left out."""
        out = []
        complete = error is None and self.ran["coverage"]
        for c in CHECKS:
            p = self.p[c]
            if p.n:
                more = f" (+{p.n - len(p.first)} more)" if p.n > len(p.first) else ""
                out.append(CheckResult(c, False, "; ".join(p.first) + more))
            elif self.ran[c]:
                out.append(CheckResult(c, True, self.facts.get(c, "passed")))
            elif c == "radix-leveled" and complete:
                out.append(CheckResult(c, True, f"skipped: the store has only the "
                                                f"{self.layers[0]} layer"))
        if error is not None:
            out.append(CheckResult("read", False, error))
        return out


def verify_store(url: str, batch_nodes: int = 1 << 22, progress: bool = False) -> list[CheckResult]:
    """Run every check on the trie store at url; a store that cannot be read fails `open`/`read`."""
    from agpt.store.trie import open_trie

    try:
        store = open_trie(url)
    except AgptError as e:
        return [CheckResult("open", False, str(e))]
    v = _Verifier(store, batch_nodes, progress)
    try:
        v.run()
    except AgptError as e:
        return v.results(str(e))
    except (ValueError, IndexError, TypeError, KeyError) as e:  # damage the checks did not foresee
        return v.results(f"the store is inconsistent ({type(e).__name__}: {e})")
    return v.results(None)
