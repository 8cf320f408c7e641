"""Small corpus and trie stores built in-process for the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import strategies as st

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


RADIX_FIELDS = ("parent", "head", "mass", "edge_ptr", "edge_tokens", "count_ptr", "count_token",
                "count_value", "part_ptr")


def assert_same_fields(a, b, fields: tuple[str, ...]) -> None:
    """a and b hold equal arrays (same dtype, same values) under every name in `fields`."""
    for f in fields:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype, f
        np.testing.assert_array_equal(x, y, err_msg=f)


@st.composite
def corpora(draw, max_vocab: int, max_len: int, max_cuts: int, dtype=np.int64):
    """(tokens, documents): a random token string of 2..max_len tokens from a vocabulary of
    1..max_vocab, cut into up to max_cuts + 1 documents (at least one of >= 2 tokens)."""
    V = draw(st.integers(1, max_vocab))
    n = draw(st.integers(2, max_len))
    toks = np.array(draw(st.lists(st.integers(0, V - 1), min_size=n, max_size=n)), dtype)
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=max_cuts)))
    b = [0, *cuts, n]
    docs = [(x, y) for x, y in zip(b[:-1], b[1:], strict=True)]
    if all(y - x < 2 for x, y in docs):
        docs = [(0, n)]
    return toks, docs
