"""Brute-force trie oracle: count substrings directly (SPEC §4 definitions, no cleverness)."""

from __future__ import annotations

from collections import Counter, defaultdict


def leveled_oracle(tokens, docs, depth):
    """{d: {path_tuple: (mass, Counter(next -> n))}} over every start with a successor."""
    out = defaultdict(dict)
    for a, b in docs:
        for i in range(a, b - 1):  # a start must have a successor (i <= b-2)
            for d in range(1, depth + 1):
                if i + d > b:
                    break
                p = tuple(int(x) for x in tokens[i:i + d])
                mass, cnt = out[d].get(p, (0, Counter()))
                if i + d < b:
                    mass += 1
                    cnt[int(tokens[i + d])] += 1
                out[d][p] = (mass, cnt)
    return out
