"""Small corpus and trie stores built in-process for the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agpt.ingest import ingest
from agpt.trie.plan import Plan, assign, make_plan
from pipelines.build import BuildConfig, build_trie


def make_corpus(tmp: Path, texts: list[str], documents: bool = False, holdout: float = 0.0) -> str:
    files = []
    for i, t in enumerate(texts):
        f = tmp / f"doc{i:03d}.txt"
        f.write_text(t, encoding="utf-8")
        files.append(str(f))
    out = str(tmp / "corpus.zarr")
    ingest(files, out, holdout=holdout, documents=documents, force=True)
    return out


def make_trie(tmp: Path, texts: list[str], D: int, partition: str = "unigram",
              documents: bool = False, holdout: float = 0.0, **kw) -> str:
    """A radix trie store of `texts` (one corpus per tmp directory)."""
    corpus = make_corpus(tmp, texts, documents, holdout)
    out = str(tmp / f"trie-{partition}-{D}.zarr")
    build_trie(corpus, out, "radix", BuildConfig(max_depth=D, partition=partition, progress=False,
                                                 workers=1, **kw))
    return out


def plan_starts(tokens: np.ndarray, docs: list[tuple[int, int]], D: int, scheme: str,
                budget: int | None) -> tuple[np.ndarray, np.ndarray, Plan, np.ndarray, int]:
    """(starts, ends, plan, partition of each start, V) for raw tokens split into documents,
    the way the in-memory build plans them (prefix counts by brute force)."""
    V = int(tokens.max()) + 1
    starts = np.concatenate([np.arange(a, b - 1) for a, b in docs if b - a >= 2]).astype(np.int64)
    ends = np.concatenate([np.full(b - 1 - a, b) for a, b in docs if b - a >= 2]).astype(np.int64)

    def counts(k: int, parents):
        sel = starts[ends - starts >= k]
        if parents is not None and sel.size:
            pc = np.zeros(len(sel), np.int64)
            for j in range(k - 1):
                pc = pc * V + tokens[sel + j]
            i = np.minimum(np.searchsorted(parents, pc), len(parents) - 1)
            sel = sel[parents[i] == pc]
        code = np.zeros(len(sel), np.int64)
        for j in range(k):
            code = code * V + tokens[sel + j]
        return np.unique(code, return_counts=True)

    plan = make_plan(scheme, counts, V, D, budget)
    pid = assign(plan, tokens, starts, np.minimum(ends - starts, D + 1))
    return starts, ends, plan, pid, V
