"""Partition plans: which prefixes root the partitions, and the spine above them (SPEC §4).

A plan is made from prefix counts alone (how many start positions begin with each k-gram),
so it is cheap for any corpus size: `unigram` roots a partition at every first token,
`bigram` at every first two tokens, `auto` starts at the root's children and splits every
prefix with more than `budget` start positions into its children, recursively. Split
prefixes form the spine; their next-token counts are the counts of their children prefixes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from agpt.errors import AgptError

SCHEMES = ("unigram", "bigram", "auto")

#: counts(k, parents) -> (codes, counts): k-gram codes (base-V integers) present at start
#: positions whose first k-1 tokens form one of `parents` (codes of (k-1)-grams; None = all).
CountFn = Callable[[int, "np.ndarray | None"], tuple[np.ndarray, np.ndarray]]


@dataclass
class Plan:
    """Partitions (lexicographic order) and the spine; spine node 0 is the root."""

    scheme: str
    vocab_size: int
    prefixes: list[tuple[int, ...]]
    sizes: np.ndarray            # (P,) start positions under each partition root
    spine_parent_of_part: np.ndarray  # (P,) spine index of each partition root's parent
    spine_depth: np.ndarray      # (S,)
    spine_token: np.ndarray      # (S,) last token of the spine prefix (0 for the root)
    spine_parent: np.ndarray     # (S,) -1 for the root
    spine_count_ptr: np.ndarray  # (S+1,)
    spine_count_token: np.ndarray
    spine_count_value: np.ndarray
    spine_prefixes: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def n_partitions(self) -> int:
        return len(self.prefixes)

    @property
    def spine_mass(self) -> np.ndarray:
        c = np.concatenate(([0], np.cumsum(self.spine_count_value)))
        return c[self.spine_count_ptr[1:]] - c[self.spine_count_ptr[:-1]]

    def code_levels(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per prefix length k: (sorted codes of partition prefixes, their ids, sorted split codes)."""
        V = self.vocab_size
        kmax = max(len(p) for p in self.prefixes) if self.prefixes else 0
        out = []
        for k in range(1, kmax + 1):
            ids = [i for i, p in enumerate(self.prefixes) if len(p) == k]
            codes = np.array([encode(self.prefixes[i], V) for i in ids], dtype=np.int64)
            o = np.argsort(codes)
            split = np.array(sorted(encode(p, V) for p in self.spine_prefixes if len(p) == k),
                             dtype=np.int64)
            out.append((codes[o], np.array(ids, dtype=np.int64)[o], split))
        return out


def encode(prefix: tuple[int, ...], vocab_size: int) -> int:
    code = 0
    for t in prefix:
        code = code * vocab_size + int(t)
    return code


def decode(code: int, k: int, vocab_size: int) -> tuple[int, ...]:
    out = []
    for _ in range(k):
        code, t = divmod(int(code), vocab_size)
        out.append(t)
    return tuple(reversed(out))


def make_plan(scheme: str, counts: CountFn, vocab_size: int, max_depth: int,
              budget: int | None = None) -> Plan:
    """Plan partitions from prefix counts (see module docstring)."""
    if scheme not in SCHEMES:
        raise AgptError(f"unknown partition scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
    if scheme == "bigram" and max_depth < 2:
        raise AgptError("--partition bigram needs --max-depth >= 2; use unigram")
    V = vocab_size
    # level_counts[k] = (codes, counts) of k-grams under split (k-1)-prefixes
    split: dict[int, np.ndarray] = {0: np.zeros(1, dtype=np.int64)}  # the root is split
    level: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    parts: list[tuple[int, int, int]] = []  # (k, code, size)
    k = 1
    while True:
        codes, cnt = counts(k, None if k == 1 else split[k - 1])
        level[k] = (codes, cnt)
        # A depth-D prefix is one leaf and cannot be split: it builds as one partition.
        if scheme == "unigram" or (scheme == "bigram" and k == 2) or k == max_depth:
            big = np.zeros(len(codes), dtype=bool)
        elif scheme == "bigram":
            big = np.ones(len(codes), dtype=bool)
        else:
            big = cnt > max(int(budget or 0), 1)
        parts += [(k, int(c), int(n)) for c, n in zip(codes[~big], cnt[~big], strict=True)]
        if not big.any():
            break
        split[k] = np.sort(codes[big])
        k += 1
    prefixes = [decode(c, kk, V) for kk, c, _ in parts]
    order = sorted(range(len(parts)), key=lambda i: prefixes[i])
    prefixes = [prefixes[i] for i in order]
    sizes = np.array([parts[i][2] for i in order], dtype=np.int64)

    # Spine: root + split prefixes, in lexicographic order, counts = children's prefix counts.
    spine_prefixes = [()] + sorted(decode(c, kk, V) for kk, cs in split.items() if kk > 0 for c in cs)
    index = {p: i for i, p in enumerate(spine_prefixes)}
    ptr, ctok, cval = [0], [], []
    for p in spine_prefixes:
        codes, cnt = level[len(p) + 1]
        lo = encode(p, V) * V
        a, b = np.searchsorted(codes, [lo, lo + V])
        ctok.append(codes[a:b] - lo)
        cval.append(cnt[a:b])
        ptr.append(ptr[-1] + (b - a))
    spine_parent = np.array([-1] + [index[p[:-1]] for p in spine_prefixes[1:]], dtype=np.int64)
    return Plan(
        scheme=scheme, vocab_size=V, prefixes=prefixes, sizes=sizes,
        spine_parent_of_part=np.array([index[p[:-1]] for p in prefixes], dtype=np.int64),
        spine_depth=np.array([len(p) for p in spine_prefixes], dtype=np.int16),
        spine_token=np.array([p[-1] if p else 0 for p in spine_prefixes], dtype=np.int64),
        spine_parent=spine_parent,
        spine_count_ptr=np.array(ptr, dtype=np.int64),
        spine_count_token=np.concatenate(ctok).astype(np.int64),
        spine_count_value=np.concatenate(cval).astype(np.int64),
        spine_prefixes=spine_prefixes,
    )


def assign(plan: Plan, tokens: np.ndarray, rel_starts: np.ndarray, klen: np.ndarray) -> np.ndarray:
    """Partition id of each start (-1: the start ends inside the spine and roots no partition).

    tokens[rel_starts[j] + i] must be readable for i < min(klen[j], longest prefix).
    """
    V = plan.vocab_size
    pid = np.full(len(rel_starts), -1, dtype=np.int64)
    todo = np.arange(len(rel_starts))
    code = np.zeros(len(rel_starts), dtype=np.int64)
    for k, (codes, ids, split) in enumerate(plan.code_levels(), start=1):
        todo = todo[klen[todo] >= k]
        if todo.size == 0:
            break
        c = code[todo] * V + tokens[rel_starts[todo] + (k - 1)]
        code[todo] = c
        if V ** k <= _LUT_MAX:  # small code space: one table lookup per start
            lut = np.full(V ** k, -1, dtype=np.int64)
            lut[codes] = ids
            lut[split] = -2
            r = lut[c]
            hit = r >= 0
            pid[todo[hit]] = r[hit]
            todo = todo[r == -2]
            continue
        j = np.minimum(np.searchsorted(codes, c), max(len(codes) - 1, 0))
        hit = (codes[j] == c) if len(codes) else np.zeros(len(c), dtype=bool)
        pid[todo[hit]] = ids[j[hit]]
        if len(split) == 0:
            break
        s = np.minimum(np.searchsorted(split, c), len(split) - 1)
        todo = todo[~hit & (split[s] == c)]
    return pid


#: largest prefix-code space that `assign` resolves with a lookup table (32 MiB of int64)
_LUT_MAX = 1 << 22


def partition_ranges(sizes: np.ndarray, cap: int, min_ranges: int = 1) -> list[tuple[int, int]]:
    """Consecutive partition ranges of total size <= cap (a bigger partition stands alone),
    and at least `min_ranges` of them when there are enough partitions (work for every worker)."""
    sizes = np.asarray(sizes)
    total = int(sizes.sum())
    cap = max(1, min(cap, -(-total // max(min_ranges, 1)) if total else 1))
    out, lo, acc = [], 0, 0
    for p, s in enumerate(sizes.tolist()):
        if p > lo and acc + s > cap:
            out.append((lo, p))
            lo, acc = p, 0
        acc += s
    if lo < len(sizes):
        out.append((lo, len(sizes)))
    return out
