"""`agpt verify`: good stores pass; targeted damage to any array is caught and named."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agpt.errors import AgptError
from agpt.ingest import ingest
from agpt.store.format import write_array
from agpt.store.trie import open_trie
from agpt.verify import CHECKS, verify_store
from pipelines.build import BuildConfig, build_trie

D = 6


def cfg(depth: int = D, **kw) -> BuildConfig:
    return BuildConfig(max_depth=depth, progress=False, workers=1, scheduler="synchronous", **kw)


def make_store(tmp: Path, layers=("radix", "leveled"), documents: bool = True, seed: int = 0,
               **kw) -> str:
    rng = np.random.default_rng(seed)
    files = []
    for i in range(3):
        f = tmp / f"d{i}.txt"
        f.write_text("".join(rng.choice(list("abcd"), int(rng.integers(40, 160)))))
        files.append(str(f))
    corpus = str(tmp / "c.zarr")
    ingest(files, corpus, holdout=0.1, documents=documents, force=True)
    out = str(tmp / "t.zarr")
    for layer in layers:
        build_trie(corpus, out, layer, cfg(**kw))
    return out


def failed(url: str) -> dict[str, str]:
    return {r.name: r.detail for r in verify_store(url) if not r.ok}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> str:
    return make_store(tmp_path_factory.mktemp("good"), partition="auto", partition_budget=30)


@pytest.fixture
def bad(good: str, tmp_path: Path) -> str:
    dst = str(tmp_path / "bad.zarr")
    shutil.copytree(good, dst)
    return dst


def edit(url: str, name: str, fn: Callable[[np.ndarray], np.ndarray]) -> None:
    """Rewrite one array of the store (same codecs; the shape may change)."""
    g = zarr.open_group(url, mode="r+")
    grp, _, leaf = name.rpartition("/")
    write_array(g[grp] if grp else g, leaf, fn(np.asarray(g[name][...])))


def at(i: int, delta: int) -> Callable[[np.ndarray], np.ndarray]:
    def f(a: np.ndarray) -> np.ndarray:
        a = a.copy()
        a[i] = a[i] + delta
        return a
    return f


# ---------------------------------------------------------------------------------------------

def test_good_store_passes(good: str, run_cli) -> None:
    res = verify_store(good)
    assert [r.name for r in res] == [c for c in CHECKS if c != "pruning"]
    assert all(r.ok for r in res), [r.line() for r in res if not r.ok]
    code, out, err = run_cli("verify", good)
    assert code == 0 and out.splitlines()[0].startswith("ok partitions: ")
    assert all(line.startswith("ok ") for line in out.splitlines())
    code, out, _ = run_cli("verify", good, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["ok"] and {c["name"] for c in doc["checks"]} >= {"coverage"}


@pytest.mark.parametrize("scheme", ["unigram", "bigram", "auto"])
@pytest.mark.parametrize("layers", [("radix",), ("leveled",), ("leveled", "radix")])
def test_layers_schemes_single_stream(tmp_path: Path, scheme: str, layers) -> None:
    url = make_store(tmp_path, layers, documents=False, seed=len(scheme), partition=scheme,
                     partition_budget=20)
    assert failed(url) == {}


def test_pruned_store_passes_and_pruning_is_checked(tmp_path: Path) -> None:
    url = make_store(tmp_path, seed=3, prune_min_mass=3, prune_min_depth=3)
    res = verify_store(url)
    assert "pruning" in [r.name for r in res] and all(r.ok for r in res), [r.line() for r in res]
    # claim a kept depth-4 node's counts are lower: the one-by-one count check sees it
    g = zarr.open_group(url, mode="r")
    lp = g["partitions/leveled_ptr"][...]
    cptr = g["leveled/count_ptr"][...]
    i = int(lp[3, 0])  # first node of depth 4
    j = int(cptr[i])
    edit(url, "leveled/count_value", at(j, -1))
    edit(url, "leveled/mass", at(i, -1))
    assert "coverage" in failed(url)


@pytest.mark.parametrize("claimed,detail", [(2, "dropped nodes"), (5, "kept nodes")])
def test_pruning_rule_is_checked_against_the_corpus(tmp_path: Path, claimed: int, detail: str) -> None:
    # built with min_mass 3; a store claiming 2 dropped nodes of mass 2, claiming 5 keeps
    # nodes of mass 3 and 4: both break the rule
    url = make_store(tmp_path, layers=("leveled",), seed=4, prune_min_mass=3, prune_min_depth=2)
    g = zarr.open_group(url, mode="r+")
    meta = dict(g.attrs["agpt"])
    meta["build"] = {**meta["build"], "prune_min_mass": claimed}
    g.attrs["agpt"] = meta
    f = failed(url)
    assert set(f) == {"pruning"} and detail in f["pruning"]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(alphabet="abc", min_size=1, max_size=30), min_size=1, max_size=3),
       depth=st.integers(1, 12), documents=st.booleans(), holdout=st.sampled_from([0.0, 0.3]),
       scheme=st.sampled_from(["unigram", "bigram", "auto"]), min_mass=st.sampled_from([0, 2]),
       min_depth=st.integers(0, 4), batch=st.integers(1, 40))
def test_random_stores_pass(tmp_path_factory, texts, depth, documents, holdout, scheme, min_mass,
                            min_depth, batch) -> None:
    d = tmp_path_factory.mktemp("r")
    files = []
    for i, t in enumerate(texts):
        (d / f"{i}.txt").write_text(t)
        files.append(str(d / f"{i}.txt"))
    try:
        ingest(files, str(d / "c.zarr"), holdout=holdout, documents=documents)
        c = cfg(depth, partition=scheme if depth >= 2 else "unigram", partition_budget=4,
                prune_min_mass=min_mass, prune_min_depth=min_depth)
        for layer in ("radix", "leveled"):
            build_trie(str(d / "c.zarr"), str(d / "t.zarr"), layer, c)
    except AgptError:
        return  # too little text to train on
    res = verify_store(str(d / "t.zarr"), batch_nodes=batch)
    assert all(r.ok for r in res), [r.line() for r in res if not r.ok]


# -- targeted damage --------------------------------------------------------------------------

def _node_with_counts(url: str, k: int, min_entries: int = 1) -> tuple[int, int]:
    """(leveled index, first count entry) of a depth-k node with >= min_entries counts."""
    g = zarr.open_group(url, mode="r")
    lp = g["partitions/leveled_ptr"][...]
    cptr = g["leveled/count_ptr"][...]
    lo, hi = int(lp[k - 1, 0]), int(lp[k - 1, -1])
    ne = np.diff(cptr)[lo:hi]
    i = lo + int(np.flatnonzero(ne >= min_entries)[0])
    return i, int(cptr[i])


def test_mass_edit_is_caught(bad: str) -> None:
    i, _ = _node_with_counts(bad, 3)
    edit(bad, "leveled/mass", at(i, 1))
    f = failed(bad)
    assert "conservation" in f and "radix-leveled" in f


def test_edge_token_edit_is_caught(bad: str) -> None:
    g = zarr.open_group(bad, mode="r")
    elen = np.diff(g["radix/edge_ptr"][...])
    i = int(g["radix/edge_ptr"][int(np.flatnonzero(elen > 2)[0])]) + 1  # inside a long edge
    tok = g["radix/edge_tokens"][...]
    edit(bad, "radix/edge_tokens", at(i, 1 if tok[i] < 3 else -1))
    assert "radix-leveled" in failed(bad)


def test_dropped_count_is_caught(bad: str) -> None:
    i, j = _node_with_counts(bad, 2, min_entries=2)
    edit(bad, "leveled/count_token", lambda a: np.delete(a, j))
    edit(bad, "leveled/count_value", lambda a: np.delete(a, j))
    edit(bad, "leveled/count_ptr", lambda a: np.where(np.arange(len(a)) > i, a - 1, a))
    f = failed(bad)
    assert "conservation" in f and "radix-leveled" in f


def test_dropped_count_with_matching_mass_is_caught(bad: str) -> None:
    # consistent locally (counts still sum to the mass): the corpus comparison must see it
    i, j = _node_with_counts(bad, D, min_entries=2)
    v = int(zarr.open_group(bad, mode="r")["leveled/count_value"][j])
    for name in ("leveled/count_token", "leveled/count_value"):
        edit(bad, name, lambda a: np.delete(a, j))
    edit(bad, "leveled/count_ptr", lambda a: np.where(np.arange(len(a)) > i, a - 1, a))
    edit(bad, "leveled/mass", at(i, -v))
    shutil.rmtree(Path(bad) / "radix")  # leveled only: no layer to compare with
    g = zarr.open_group(bad, mode="r+")
    meta = dict(g.attrs["agpt"])
    meta["layers"] = {"leveled": meta["layers"]["leveled"]}
    g.attrs["agpt"] = meta
    assert "coverage" in failed(bad)


def test_moved_count_at_depth_d_is_caught(bad: str) -> None:
    # +1 on one next-token count and -1 on its sibling: sums, masses and structure still agree
    i, j = _node_with_counts(bad, D, min_entries=2)
    edit(bad, "leveled/count_value", lambda a: np.concatenate((a[:j], [a[j] + 1, a[j + 1] - 1],
                                                                a[j + 2:])))
    f = failed(bad)
    assert "coverage" in f and "conservation" not in f


@pytest.mark.parametrize("name,pick,check", [
    ("radix/count_value", 0, "radix-leveled"),
    ("radix/mass", 1, "conservation"),
    ("radix/parent", 5, "structure"),
    ("radix/head", 3, "structure"),
    ("leveled/parent", -1, "structure"),
    ("leveled/token", -1, "structure"),
    ("spine/mass", 0, "conservation"),
    ("partitions/size", 2, "partitions"),
    ("corpus/tokens", 50, "coverage"),
])
def test_single_value_edits_are_caught(bad: str, name: str, pick: int, check: str) -> None:
    edit(bad, name, at(pick, 1))
    assert check in failed(bad)


def test_sibling_order_is_checked(bad: str) -> None:
    g = zarr.open_group(bad, mode="r")
    par = g["leveled/parent"][...]
    k = int(np.flatnonzero((par[1:] == par[:-1]) & (par[1:] >= 0))[0])  # two siblings
    edit(bad, "leveled/token", lambda a: np.concatenate((a[:k], a[k:k + 2][::-1], a[k + 2:])))
    assert "structure" in failed(bad)


def test_missing_chunk_fails_in_one_line(bad: str, run_cli) -> None:
    chunk = next(p for p in sorted((Path(bad) / "leveled" / "mass").rglob("*"))
                 if p.is_file() and p.name != "zarr.json")
    chunk.unlink()
    res = verify_store(bad)
    assert [(r.name, r.ok) for r in res] == [("open", False)] and "missing" in res[0].detail
    code, out, err = run_cli("verify", bad)
    assert code == 1 and "Traceback" not in err + out
    assert out.strip().splitlines() == [f"FAIL open: {res[0].detail}"]


def test_corrupt_chunk_is_reported_not_raised(bad: str, run_cli) -> None:
    chunk = next(p for p in sorted((Path(bad) / "leveled" / "count_value").rglob("*"))
                 if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    code, out, err = run_cli("verify", bad)
    assert code == 1 and "Traceback" not in err + out
    assert any(line.startswith("FAIL read: ") and "corrupt" in line for line in out.splitlines())


def test_not_a_store(tmp_path: Path, run_cli) -> None:
    code, out, err = run_cli("verify", tmp_path / "nothing.zarr")
    assert code == 1 and out.startswith("FAIL open: ") and "Traceback" not in err


# -- the reference corpus ------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["unigram", "bigram", "auto"])
def test_tinyshakespeare_d8(tmp_path: Path, tiny_shakespeare: Path, scheme: str) -> None:
    corpus = str(tmp_path / "ts.zarr")
    ingest([str(tiny_shakespeare)], corpus, holdout=0.0)
    out = str(tmp_path / "t.zarr")
    c = BuildConfig(max_depth=8, partition=scheme, partition_budget=100_000, progress=False)
    build_trie(corpus, out, "leveled", c)
    build_trie(corpus, out, "radix", c)
    res = verify_store(out)
    assert all(r.ok for r in res), [r.line() for r in res if not r.ok]
    assert open_trie(out).totals()["leveled_nodes"] == 1_545_083
