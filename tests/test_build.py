"""Trie builds against a brute-force oracle, through the store, for every partition scheme."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import leveled_oracle
from stores import make_corpus

from agpt.errors import AgptError, StoreFormatError
from agpt.ingest import ingest
from agpt.store.trie import open_trie
from agpt.trie.radix import expand
from pipelines import build as build_mod
from pipelines.build import BuildConfig, build_trie


def cfg(D: int, **kw) -> BuildConfig:
    return BuildConfig(max_depth=D, progress=False, workers=2, **kw)


def store_levels(url: str) -> dict[int, dict[tuple, tuple[int, dict]]]:
    """{depth: {path: (mass, counts)}} read back from the leveled layer and the spine."""
    t = open_trie(url)
    sp = t.spine()
    spine_paths = [()]
    for i in range(1, len(sp.depth)):
        spine_paths.append(spine_paths[sp.parent[i]] + (int(sp.token[i]),))
    out: dict[int, dict] = {}
    for i in range(1, len(sp.depth)):
        c = {int(sp.count_token[j]): int(sp.count_value[j])
             for j in range(sp.count_ptr[i], sp.count_ptr[i + 1])}
        out.setdefault(int(sp.depth[i]), {})[spine_paths[i]] = (int(sp.mass[i]), c)
    prefixes = t.partition_prefixes()
    spp = t.spine_parent_of_partition()
    for p in range(t.n_partitions):
        prev: list[tuple] = []
        for k, L in enumerate(t.leveled_partition(p), 1):
            cur = []
            for i in range(L.n_nodes):
                base = prev[L.parent[i]] if L.parent[i] >= 0 else spine_paths[spp[p]]
                path = base + (int(L.token[i]),)
                assert len(path) == k and path[: len(prefixes[p])] == prefixes[p]
                cur.append(path)
                c = {int(L.count_token[j]): int(L.count_value[j])
                     for j in range(L.count_ptr[i], L.count_ptr[i + 1])}
                assert path not in out.get(k, {}), "node in two partitions"
                out.setdefault(k, {})[path] = (int(L.mass[i]), c)
            assert cur == sorted(cur), "depth not in lexicographic order"
            prev = cur
    return out


def oracle_levels(tokens: np.ndarray, docs, D: int) -> dict:
    orc = leveled_oracle(tokens, docs, D)
    return {d: {p: (m, dict(c)) for p, (m, c) in nodes.items()} for d, nodes in orc.items() if nodes}


def check_store(url: str, corpus_url: str, D: int) -> None:
    from agpt.store.corpus import open_corpus
    c = open_corpus(corpus_url)
    docs = c.train_documents().tolist()
    exp = oracle_levels(c.tokens(), docs, D)
    got = store_levels(url)
    assert {k: v for k, v in got.items() if v} == exp
    t = open_trie(url)
    # the radix layer expands to the stored leveled layer, partition by partition
    for p in range(t.n_partitions):
        lv = expand(t.radix_partition(p), D)
        for a, b in zip(lv, t.leveled_partition(p), strict=True):
            for f in ("token", "parent", "mass", "count_ptr", "count_token", "count_value"):
                np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    per = [0] * D
    for k, nodes in exp.items():
        per[k - 1] = len(nodes)
    assert t.totals()["leveled_per_depth"] == per
    assert t.totals()["leveled_nodes"] == 1 + sum(per)


def build_both(corpus: str, out: str, D: int, **kw) -> None:
    build_trie(corpus, out, "radix", cfg(D, **kw))
    build_trie(corpus, out, "leveled", cfg(D, **kw))


@pytest.mark.parametrize("scheme", ["unigram", "bigram", "auto"])
@pytest.mark.parametrize("spill", [False, True])
def test_random_corpora_all_schemes(tmp_path: Path, scheme: str, spill: bool) -> None:
    rng = np.random.default_rng(hash((scheme, spill)) % 2**32)
    for trial in range(4):
        V = int(rng.integers(1, 6))
        n = int(rng.integers(2, 300))
        D = int(rng.integers(2 if scheme == "bigram" else 1, 10))
        text = "".join(rng.choice(list("abcdef"[:V]), n))
        d = tmp_path / f"{trial}"
        d.mkdir()
        corpus = make_corpus(d, [text])
        kw = {"partition": scheme, "out_of_core": spill}
        if scheme == "auto":
            kw["partition_budget"] = int(rng.integers(1, 40))
        if spill:
            kw["chunk_tokens"] = int(rng.integers(5, 60))
        build_both(corpus, str(d / "t.zarr"), D, **kw)
        check_store(str(d / "t.zarr"), corpus, D)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(alphabet="ab\u00e9\u4e2d\U0001f600", min_size=1, max_size=40),
                      min_size=1, max_size=4),
       D=st.integers(1, 12), documents=st.booleans(), holdout=st.sampled_from([0.0, 0.25]),
       scheme=st.sampled_from(["unigram", "auto"]))
def test_property_documents_unicode(tmp_path_factory, texts, D, documents, holdout, scheme) -> None:
    d = tmp_path_factory.mktemp("p")
    try:
        corpus = make_corpus(d, texts, documents=documents, holdout=holdout)
    except AgptError:
        return  # too short to train on: ingest refuses, which test_ingest covers
    kw = {"partition": scheme}
    if scheme == "auto":
        kw["partition_budget"] = 3
    try:
        build_both(corpus, str(d / "t.zarr"), D, **kw)
    except AgptError as e:
        assert "no training start positions" in str(e)
        return
    check_store(str(d / "t.zarr"), corpus, D)


@pytest.mark.parametrize("text,D", [("ab", 1), ("ab", 5), ("aaaaaaaa", 3), ("a" * 50, 60),
                                    ("abcabcabc", 40), ("\u00e9\u00e9x\u00e9", 4)])
def test_edge_cases(tmp_path: Path, text: str, D: int) -> None:
    corpus = make_corpus(tmp_path, [text])
    build_both(corpus, str(tmp_path / "t.zarr"), D)
    check_store(str(tmp_path / "t.zarr"), corpus, D)


def test_single_token_corpus_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    with pytest.raises(AgptError):
        ingest([str(tmp_path / "a.txt")], str(tmp_path / "c.zarr"), holdout=0.0)


def test_documents_do_not_cross(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path, ["abc", "cab", "bca"], documents=True)
    build_both(corpus, str(tmp_path / "t.zarr"), 4)
    got = store_levels(str(tmp_path / "t.zarr"))
    # "ca" occurs only across the boundary doc0|doc1 in the joined stream... and inside doc1
    assert (2, 0) in got[2]  # 'ca' inside "cab"
    assert all(len(p) <= 3 for k in got for p in got[k])  # no context longer than a document


def test_pruning_matches_leveled_rule(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    text = "".join(rng.choice(list("abc"), 400))
    corpus = make_corpus(tmp_path, [text])
    D, mm, md = 8, 3, 4
    build_both(corpus, str(tmp_path / "t.zarr"), D, prune_min_mass=mm, prune_min_depth=md)
    got = store_levels(str(tmp_path / "t.zarr"))
    from agpt.store.corpus import open_corpus
    c = open_corpus(corpus)
    full = oracle_levels(c.tokens(), c.train_documents().tolist(), D)
    exp: dict = {}
    for k in range(1, D + 1):
        for p, (m, cnt) in full.get(k, {}).items():
            pruned = any(full[j][p[:j]][0] < mm and j >= md for j in range(1, k + 1))
            if not pruned:
                exp.setdefault(k, {})[p] = (m, cnt)
    assert {k: v for k, v in got.items() if v} == exp


def test_interrupted_build_never_opens_and_resumes(tmp_path: Path, monkeypatch) -> None:
    rng = np.random.default_rng(3)
    corpus = make_corpus(tmp_path, ["".join(rng.choice(list("abcd"), 3000))])
    out = str(tmp_path / "t.zarr")
    kw = {"partition": "auto", "partition_budget": 200, "out_of_core": True, "chunk_tokens": 500,
          "task_keys": 250}
    real = build_mod._spill_task
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(build_mod, "_spill_task", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_trie(corpus, out, "radix", BuildConfig(max_depth=6, progress=False, workers=1,
                                                     scheduler="synchronous", **kw))
    with pytest.raises(StoreFormatError, match="unfinished"):
        open_trie(out)
    staged = [p for p in Path(out + ".work").glob("stage-radix/*") if not p.name.endswith(".tmp")]
    assert len(staged) == 4
    done = {"n": 0}

    def counting(*a, **k):
        done["n"] += 0 if os.path.exists(a[-1]) else 1
        return real(*a, **k)

    monkeypatch.setattr(build_mod, "_spill_task", counting)
    res = build_trie(corpus, out, "radix", BuildConfig(max_depth=6, progress=False, workers=1,
                                                       scheduler="synchronous", **kw))
    assert done["n"] >= 1 and done["n"] + 4 == len(build_mod._group_tasks(
        open_trie(out).partition_sizes, 250, 1))  # only the missing tasks ran again
    del res
    assert open_trie(out).layers == ("radix",)
    assert not Path(out + ".work").exists()
    build_trie(corpus, out, "leveled", cfg(6, **kw))
    check_store(out, corpus, 6)


def _markov_text(n: int, seed: int) -> str:
    """Order-2 character chain over a small alphabet: long shared contexts, many leaves."""
    rng = np.random.default_rng(seed)
    alpha = np.array(list("abcde fg"))
    out = list("ab")
    table = rng.dirichlet(np.full(len(alpha), 0.3), size=(len(alpha), len(alpha)))
    idx = {c: i for i, c in enumerate(alpha)}
    for _ in range(n - 2):
        p = table[idx[out[-2]], idx[out[-1]]]
        out.append(str(alpha[rng.choice(len(alpha), p=p)]))
    return "".join(out)


@pytest.mark.parametrize("scheduler", ["threads", "processes"])
def test_spilled_build_equals_in_memory_build(tmp_path: Path, scheduler: str) -> None:
    """Out of core under a small memory limit (many buckets and tasks) = the in-memory build,
    array for array; the radix layer expands to the same leveled layer."""
    texts = [_markov_text(30_000, 1), _markov_text(12_000, 2), "ab"]
    corpus = make_corpus(tmp_path, texts, documents=True)
    kw = {"partition": "auto", "partition_budget": 2_000}
    mem, ooc = str(tmp_path / "mem.zarr"), str(tmp_path / "ooc.zarr")
    build_trie(corpus, mem, "radix", cfg(12, **kw))
    build_trie(corpus, ooc, "radix", cfg(12, out_of_core=True, memory_limit=400 << 20,
                                         chunk_tokens=4_000, task_keys=3_000,
                                         scheduler=scheduler, **kw))
    a, b = open_trie(mem), open_trie(ooc)
    assert a.totals() == b.totals() and a.n_partitions == b.n_partitions > 10
    ra, rb = a.radix(), b.radix()
    for f in ("parent", "head", "mass", "edge_ptr", "edge_tokens", "count_ptr", "count_token",
              "count_value", "part_ptr"):
        assert np.array_equal(getattr(ra, f), getattr(rb, f)), f
    assert not Path(ooc + ".work").exists()


def test_work_dir_of_another_layout_is_discarded(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path, [_markov_text(3_000, 3)])
    out = str(tmp_path / "t.zarr")
    work = Path(out + ".work")
    (work / "buckets" / "000000").mkdir(parents=True)
    (work / "buckets" / "000000" / "done").touch()  # would be trusted if the layout matched
    (work / "layout").write_text("1")
    build_trie(corpus, out, "radix", cfg(6, out_of_core=True, chunk_tokens=500))
    ref = str(tmp_path / "ref.zarr")
    build_trie(corpus, ref, "radix", cfg(6))
    assert open_trie(out).totals() == open_trie(ref).totals()
    assert not work.exists()


def test_memory_model_fits_the_limit() -> None:
    """Workers x task memory + the fixed base stay within --memory-limit."""
    for D in (8, 16, 32, 64):
        for limit in (400 << 20, 1 << 30, 8 << 30):
            per = build_mod.bytes_per_key(D, 1, "radix")
            task_keys = (limit - build_mod.BASE_BYTES) // (2 * per)
            assert 2 * task_keys * per + build_mod.BASE_BYTES <= limit
            assert per >= 100 + 4 * (D + 1)  # measured peaks: 108..289 B/key for D = 8..64


def test_tinyshakespeare_spec_figures(tmp_path: Path, tiny_shakespeare: Path) -> None:
    corpus = str(tmp_path / "ts.zarr")
    ingest([str(tiny_shakespeare)], corpus, holdout=0.0)
    spec = {8: 1_545_083, 16: 9_313_942}
    for D, total in spec.items():
        out = str(tmp_path / f"t{D}.zarr")
        build_both(corpus, out, D)
        t = open_trie(out)
        assert t.totals()["leveled_nodes"] == total
        assert t.totals()["radix_edge_tokens"] == total - 1
        assert t.totals()["leveled_per_depth"][:5] == [65, 1403, 11556, 50712, 141021]
        # the radix trie expands back to the leveled trie
        for p in range(0, t.n_partitions, 7):
            for a, b in zip(expand(t.radix_partition(p), D), t.leveled_partition(p), strict=True):
                np.testing.assert_array_equal(a.mass, b.mass)
                np.testing.assert_array_equal(a.token, b.token)
                np.testing.assert_array_equal(a.count_value, b.count_value)


@pytest.mark.slow
def test_tinyshakespeare_d32(tmp_path: Path, tiny_shakespeare: Path) -> None:
    corpus = str(tmp_path / "ts.zarr")
    ingest([str(tiny_shakespeare)], corpus, holdout=0.0)
    out = str(tmp_path / "t32.zarr")
    build_both(corpus, out, 32)
    tot = open_trie(out).totals()
    assert tot["leveled_nodes"] == 27_046_553
    assert tot["leveled_per_depth"][-1] == 1_114_331
    assert tot["radix_edge_tokens"] == 27_046_552
    assert tot["radix_nodes"] == 1_666_240  # seed 1,666,215 + 25 kept end-of-corpus leaves


# -- bad input (SPEC §10) ---------------------------------------------------------------------

@pytest.fixture
def small_corpus(tmp_path: Path) -> str:
    return make_corpus(tmp_path, ["abracadabra " * 20])


@pytest.mark.parametrize("args,msg", [
    (["-D", "0"], "max-depth"), (["-D", "100000"], "max-depth"),
    (["-D", "4", "--memory-limit", "1KB"], "too small"),
    (["-D", "4", "--memory-limit", "lots"], "memory size"),
    (["-D", "1", "--partition", "bigram"], "bigram"),
    (["-D", "4", "--scheduler", "tcp://127.0.0.1:1"], "cannot reach"),
])
def test_bad_build_arguments(run_cli, tmp_path: Path, small_corpus: str, args, msg) -> None:
    code, out, err = run_cli("build-radix", small_corpus, "-o", tmp_path / "t.zarr", *args)
    assert code != 0 and msg in err.strip().splitlines()[-1] and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1  # fails before any work
    assert not (tmp_path / "t.zarr").exists()


def test_missing_corpus(run_cli, tmp_path: Path) -> None:
    code, _, err = run_cli("build-radix", tmp_path / "nope.zarr", "-o", tmp_path / "t.zarr", "-D", "3")
    assert code != 0 and "no store" in err and "Traceback" not in err


def test_existing_output_with_other_parameters(run_cli, tmp_path: Path, small_corpus: str) -> None:
    out = tmp_path / "t.zarr"
    assert run_cli("build-radix", small_corpus, "-o", out, "-D", "3", "--quiet")[0] == 0
    code, _, err = run_cli("build-radix", small_corpus, "-o", out, "-D", "4")
    assert code != 0 and "other parameters" in err
    assert open_trie(str(out)).max_depth == 3  # untouched
    assert run_cli("build-radix", small_corpus, "-o", out, "-D", "4", "--force", "--quiet")[0] == 0
    assert open_trie(str(out)).max_depth == 4


def test_other_format_version_and_corrupt_chunk(tmp_path: Path, small_corpus: str) -> None:
    out = str(tmp_path / "t.zarr")
    build_trie(small_corpus, out, "radix", cfg(4))
    g = zarr.open_group(out, mode="r+")
    meta = dict(g.attrs["agpt"])
    g.attrs["agpt"] = {**meta, "format_version": 99}
    with pytest.raises(StoreFormatError, match="format version 99"):
        open_trie(out)
    g.attrs["agpt"] = meta
    chunk = next(Path(out, "radix", "mass", "c").rglob("*"))
    chunk.write_bytes(chunk.read_bytes()[:-3] + b"xyz")
    with pytest.raises(StoreFormatError, match="corrupt"):
        open_trie(out).radix()
    chunk.unlink()
    with pytest.raises(StoreFormatError, match="missing"):  # never read as zeros
        open_trie(out)


def test_partition_too_big_for_memory(run_cli, tmp_path: Path) -> None:
    # 2 unigram partitions of 600,000 starts; 400MiB leaves room for ~485,000 keys per task
    corpus = make_corpus(tmp_path, ["ab" * 600_000])
    code, _, err = run_cli("build-radix", corpus, "-o", tmp_path / "t.zarr", "-D", "8",
                           "--memory-limit", "400MiB", "--workers", "1")
    assert code != 0 and "--partition auto" in err
