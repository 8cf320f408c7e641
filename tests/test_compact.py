"""Leveled -> radix compaction: compact(expand(rt)) == rt, and the radix layer added from a store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from stores import RADIX_FIELDS, assert_same_fields, corpora, plan_starts

from agpt.errors import AgptError
from agpt.ingest import ingest
from agpt.store.format import token_dtype
from agpt.store.trie import open_trie
from agpt.trie.compact import compact, radix_from_leveled_store
from agpt.trie.keys import gather_keys, sort_keys
from agpt.trie.radix import RadixTrie, expand, prune, radix_from_keys
from pipelines.build import BuildConfig, build_trie

RADIX_ARRAYS = ("parent", "head", "mass", "edge_ptr", "edge_tokens", "count_ptr", "count_token",
                "count_value")


def pipeline_radix(tokens: np.ndarray, docs: list[tuple[int, int]], D: int, scheme: str,
                   budget: int | None = None, min_mass: int = 0, min_depth: int = 0):
    """The in-memory build path (plan, assign, sorted keys, radix, prune) on raw tokens."""
    starts, ends, plan, pid, V = plan_starts(tokens, docs, D, scheme, budget)
    keep = pid >= 0
    o = np.argsort(pid[keep], kind="stable")
    st_, de, pd_ = starts[keep][o], ends[keep][o], pid[keep][o]
    keys, klen = gather_keys(tokens, st_, de, D, V)
    plen = np.array([len(p) for p in plan.prefixes], np.int16)
    rt = radix_from_keys(sort_keys(keys, klen, st_, pd_, plen), token_dtype(V))
    return prune(rt, min_mass, min_depth), plan


def assert_same(a: RadixTrie, b: RadixTrie) -> None:
    assert_same_fields(a, b, RADIX_FIELDS)


@settings(max_examples=200, deadline=None)
@given(c=corpora(4, 70, 3, np.uint8), D=st.integers(1, 14), scheme=st.sampled_from(["unigram", "bigram", "auto"]),
       budget=st.integers(1, 25), min_mass=st.sampled_from([0, 0, 2, 3]), min_depth=st.integers(0, 6))
def test_compact_inverts_expand(c, D, scheme, budget, min_mass, min_depth) -> None:
    toks, docs = c
    if scheme == "bigram" and D < 2:
        scheme = "unigram"
    rt, plan = pipeline_radix(toks, docs, D, scheme, budget, min_mass, min_depth)
    plen = np.array([len(p) for p in plan.prefixes])
    assert_same(compact(expand(rt, D), plen, plan.sizes, D), rt)
    # any run of consecutive partitions compacts on its own
    P = len(plan.prefixes)
    if P == 0:  # every start ends in the spine (documents shorter than the split depth)
        return
    a, b = P // 3, max(P // 3 + 1, 2 * P // 3)
    sub = rt.slice(int(rt.part_ptr[a]), int(rt.part_ptr[b]))
    sub.part_ptr = rt.part_ptr[a: b + 1] - rt.part_ptr[a]
    assert_same(compact(expand(sub, D), plen[a:b], plan.sizes[a:b], D), sub)


def test_terminal_partition_root_needs_its_count() -> None:
    # "ab" ends the stream: the bigram root (a, b) is terminal, so it is an edge of its own
    toks = np.array([0, 1, 0, 1, 1, 0, 1], np.uint8)
    rt, plan = pipeline_radix(toks, [(0, 7)], 4, "bigram")
    plen = np.array([len(p) for p in plan.prefixes])
    assert_same(compact(expand(rt, 4), plen, plan.sizes, 4), rt)


# ---------------------------------------------------------------------------------------------
# The store driver: radix layer compacted from the leveled layer
# ---------------------------------------------------------------------------------------------

def make_corpus(tmp: Path, texts: list[str], documents: bool) -> str:
    files = []
    for i, t in enumerate(texts):
        f = tmp / f"doc{i}.txt"
        f.write_text(t, encoding="utf-8")
        files.append(str(f))
    out = str(tmp / "c.zarr")
    ingest(files, out, holdout=0.0, documents=documents, force=True)
    return out


def cfg(D: int, **kw) -> BuildConfig:
    return BuildConfig(max_depth=D, progress=False, workers=1, scheduler="synchronous", **kw)


def assert_same_radix_layer(a: str, b: str, attrs: bool = True) -> None:
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    for name in [f"radix/{f}" for f in RADIX_ARRAYS] + ["partitions/radix_ptr"]:
        x, y = ga[name], gb[name]
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x[...], y[...], err_msg=name)
    if attrs:
        assert ga.attrs["agpt"]["totals"] == gb.attrs["agpt"]["totals"]
        assert ga.attrs["agpt"]["layers"] == gb.attrs["agpt"]["layers"]


@pytest.mark.parametrize("scheme,kw", [("unigram", {}), ("bigram", {}),
                                       ("auto", {"partition_budget": 25}),
                                       ("auto", {"partition_budget": 9, "prune_min_mass": 3,
                                                 "prune_min_depth": 3})])
def test_radix_from_leveled_store_equals_direct_build(tmp_path: Path, scheme: str, kw: dict) -> None:
    rng = np.random.default_rng(len(scheme) + len(kw))
    texts = ["".join(rng.choice(list("abcd"), int(rng.integers(2, 200)))) for _ in range(3)]
    corpus = make_corpus(tmp_path, texts, documents=True)
    direct, derived = str(tmp_path / "direct.zarr"), str(tmp_path / "derived.zarr")
    c = cfg(7, partition=scheme, **kw)
    build_trie(corpus, direct, "leveled", c)
    build_trie(corpus, direct, "radix", c)
    build_trie(corpus, derived, "leveled", c)
    assert open_trie(derived).layers == ("leveled",)
    # small batches: several partition ranges are compacted and staged one at a time
    res = radix_from_leveled_store(derived, batch_nodes=40)
    assert res["radix_nodes"] == open_trie(direct).totals()["radix_nodes"]
    assert set(open_trie(derived).layers) == {"leveled", "radix"}
    assert_same_radix_layer(direct, derived)
    assert not Path(derived + ".compact.work").exists()


def test_build_radix_cli_on_a_trie_store(tmp_path: Path, run_cli) -> None:
    corpus = make_corpus(tmp_path, ["to be or not to be, that is the question"], documents=False)
    direct, derived = str(tmp_path / "direct.zarr"), str(tmp_path / "derived.zarr")
    assert run_cli("build-radix", corpus, "-o", direct, "-D", 6, "--quiet")[0] == 0
    assert run_cli("build-index", corpus, "-o", derived, "-D", 6, "--quiet")[0] == 0
    code, out, err = run_cli("build-radix", derived, "-D", 6, "--quiet")  # no -o: in place
    assert code == 0, err
    assert_same_radix_layer(direct, derived, attrs=False)
    # a second run has nothing to do; -o equal to SOURCE is accepted
    code, out, err = run_cli("build-radix", derived, "-o", derived, "-D", 6, "--quiet")
    assert code == 0 and "skipped=True" in out


def test_build_radix_from_trie_store_errors(tmp_path: Path, run_cli) -> None:
    corpus = make_corpus(tmp_path, ["abracadabra abracadabra"], documents=False)
    radix_only, lev = str(tmp_path / "r.zarr"), str(tmp_path / "l.zarr")
    build_trie(corpus, radix_only, "radix", cfg(5))
    build_trie(corpus, lev, "leveled", cfg(5))
    assert radix_from_leveled_store(radix_only)["skipped"]  # already has one: nothing to do
    for args, msg in [((lev, "-D", 6), "pass -D 5"),
                      ((lev, "-o", str(tmp_path / "other.zarr"), "-D", 5), "in place"),
                      ((corpus, "-D", 5), "-o/--out")]:
        code, out, err = run_cli("build-radix", *args, "--quiet")
        assert code == 2 and msg in err and "Traceback" not in err, (args, err)
    assert open_trie(lev).layers == ("leveled",)  # nothing was written
    # a trie store whose leveled layer is missing: a clear error
    g = zarr.open_group(radix_only, mode="r+")
    meta = dict(g.attrs["agpt"])
    meta["layers"] = {}
    g.attrs["agpt"] = meta
    with pytest.raises(AgptError, match="no leveled layer"):
        radix_from_leveled_store(radix_only)
