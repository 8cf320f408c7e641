"""`agpt profile` and `agpt info`: profile numbers against brute-force substring counts."""

from __future__ import annotations

import json
import math
import random
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import leveled_oracle

from agpt.ingest import ingest
from agpt.store.corpus import open_corpus
from agpt.store.trie import open_trie
from pipelines.build import BuildConfig, build_trie
from pipelines.profile import ModelShape, profile

BINS = 6
TINY_SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


def make_store(root: Path, texts: list[str], depth: int, partition: str = "unigram",
               layers: tuple[str, ...] = ("radix", "leveled"), budget: int | None = None,
               documents: bool = False) -> tuple[str, str]:
    """Ingest `texts` (one file each) and build the given layers; returns (corpus, trie) URLs."""
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i, t in enumerate(texts):
        f = root / f"in{i}.txt"
        f.write_text(t, encoding="utf-8")
        files.append(f)
    corpus, trie = str(root / "c.zarr"), str(root / "t.zarr")
    ingest(files, corpus, holdout=0.0, documents=documents)
    cfg = BuildConfig(max_depth=depth, partition=partition, partition_budget=budget,
                      progress=False, workers=2)
    for layer in layers:
        build_trie(corpus, trie, layer, cfg)
    return corpus, trie


def brute(trie_url: str, bins: int = BINS):
    """Expected per-depth and per-partition statistics, by counting substrings directly."""
    store = open_trie(trie_url)
    c = store.corpus
    toks = c.train_tokens().astype(np.int64)
    docs = c.train_documents().tolist()
    D = store.max_depth
    lev = leveled_oracle(toks, docs, D)
    # occurrences (terminal ones included) tell where a radix edge must stop (SPEC §4)
    occ: dict[tuple, int] = defaultdict(int)
    for a, b in docs:
        for i in range(a, b - 1):
            for d in range(1, min(D, b - i) + 1):
                occ[tuple(toks[i:i + d].tolist())] += 1
    root_counts: dict[int, int] = defaultdict(int)
    for a, b in docs:
        for i in range(a, b - 1):
            root_counts[int(toks[i])] += 1
    nodes = {(): (sum(root_counts.values()), root_counts)}
    for d in range(1, D + 1):
        nodes.update(lev[d])
    children: dict[tuple, int] = defaultdict(int)
    for p in nodes:
        if p:
            children[p[:-1]] += 1
    prefixes = store.partition_prefixes()

    def part_of(p: tuple) -> int:
        for i, r in enumerate(prefixes):
            if len(p) >= len(r) and p[:len(r)] == r:
                return i
        return -1

    def is_end(p: tuple) -> bool:
        """A radix edge stops at p: not exactly one child, a terminal occurrence, or depth D."""
        return len(p) == D or children[p] != 1 or occ[p] > nodes[p][0]

    def new_stat():
        return {"nodes": 0, "internal": 0, "children": 0, "mass": 0, "mass_max": 0,
                "singletons": 0, "ent": 0.0, "heads": 0, "edge_tokens": 0,
                "hist": [0] * bins}

    by_depth = defaultdict(new_stat)
    by_part = defaultdict(new_stat)
    for p, (mass, cnt) in nodes.items():
        part = part_of(p)
        h = sum(v * math.log(mass / v) for v in cnt.values() if v) if mass else 0.0
        for s in (by_depth[len(p)], by_part[part]):
            s["nodes"] += 1
            s["internal"] += children[p] > 0
            s["children"] += children[p]
            s["mass"] += mass
            s["mass_max"] = max(s["mass_max"], mass)
            s["singletons"] += mass == 1
            s["ent"] += h
            s["hist"][min(int(mass).bit_length(), bins - 1)] += 1
        # radix heads: first node of a partition, or the child of an edge's endpoint
        if part >= 0 and (len(p) == len(prefixes[part]) or is_end(p[:-1])):
            q = p
            while not is_end(q):
                q = next(x for x in nodes if len(x) == len(q) + 1 and x[:-1] == q)
            for s in (by_depth[len(p)], by_part[part]):
                s["heads"] += 1
                s["edge_tokens"] += len(q) - len(p) + 1
    return store, by_depth, by_part


def ratio(a, b):
    return a / b if b else float("nan")


def check_profile(trie_url: str, radix: bool = True) -> None:
    store, exp_d, exp_p = brute(trie_url)
    prof = profile(trie_url, bins=BINS, workers=2, task_nodes=64)  # tiny tasks: many of them
    d = prof.depth.set_index("depth")
    assert d.index.tolist() == list(range(store.max_depth + 1))  # empty depths too
    for k in d.index:
        row, e = d.loc[k], exp_d[k]
        assert row["nodes"] == e["nodes"], k
        assert row["internal"] == e["internal"], k
        assert row["mass"] == e["mass"], k
        assert row["mass_max"] == e["mass_max"], k
        assert row["singletons"] == e["singletons"], k
        assert [row[f"mass_h{i}"] for i in range(BINS)] == e["hist"], k
        np.testing.assert_allclose(row["branching"], ratio(e["children"], e["internal"]))
        np.testing.assert_allclose(row["singleton_frac"], ratio(e["singletons"], e["nodes"]))
        np.testing.assert_allclose(row["entropy"], ratio(e["ent"], e["mass"]), atol=1e-12)
        if radix:
            assert row["radix_heads"] == e["heads"], k
            assert row["radix_edge_tokens"] == e["edge_tokens"], k
    t = store.totals()
    if "leveled_per_depth" in t:
        assert d["nodes"].loc[1:].tolist() == t["leveled_per_depth"]
    if radix:
        assert d["radix_heads"].sum() == t["radix_nodes"]
        assert d["radix_edge_tokens"].sum() == t["radix_edge_tokens"]

    p = prof.partition
    assert p["partition"].tolist() == list(range(store.n_partitions))  # every partition, once
    assert p["starts"].tolist() == store.partition_sizes.tolist()
    shape = ModelShape()
    for _, row in p.iterrows():
        e = exp_p[int(row["partition"])]
        plen = len(store.partition_prefix(int(row["partition"])))
        assert row["nodes"] == e["nodes"]
        assert row["mass"] == e["mass"]
        assert row["singletons"] == e["singletons"]
        np.testing.assert_allclose(row["entropy"], ratio(e["ent"], e["mass"]), atol=1e-12)
        assert row["rows"] == e["nodes"] + plen - 1
        if radix:
            assert row["radix_nodes"] == e["heads"]
            assert row["radix_edge_tokens"] == e["edge_tokens"]
        assert row["est_bytes"] >= row["rows"] * shape.bytes_per_row(store.vocab_size)
    assert p["nodes"].sum() + exp_p[-1]["nodes"] == d["nodes"].sum()


@pytest.mark.parametrize("partition,budget", [("unigram", None), ("bigram", None), ("auto", 40)])
def test_profile_matches_brute_force(tmp_path: Path, partition: str, budget: int | None) -> None:
    rng = random.Random(7)
    text = "".join(rng.choice("ab c\n") for _ in range(400))
    _, trie = make_store(tmp_path, [text], 5, partition, budget=budget)
    check_profile(trie)


def test_profile_documents_and_leveled_fallback(tmp_path: Path) -> None:
    rng = random.Random(3)
    texts = ["".join(rng.choice("xyz") for _ in range(n)) for n in (60, 1, 2, 45)]
    _, trie = make_store(tmp_path / "both", texts, 4, documents=True)
    check_profile(trie)
    _, lev = make_store(tmp_path / "lev", texts, 4, layers=("leveled",), documents=True)
    assert open_trie(lev).layers == ("leveled",)
    check_profile(lev, radix=False)
    a, b = profile(trie, bins=BINS), profile(lev, bins=BINS)
    assert "radix_heads" not in b.depth.columns
    pd.testing.assert_frame_equal(a.depth[b.depth.columns], b.depth)
    common = [c for c in b.partition.columns if c in a.partition.columns]
    pd.testing.assert_frame_equal(a.partition[common], b.partition[common])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(alphabet="abc\n", min_size=2, max_size=120),
       depth=st.integers(1, 6), partition=st.sampled_from(["unigram", "bigram", "auto"]))
def test_profile_hypothesis(text: str, depth: int, partition: str) -> None:
    if partition == "bigram":
        depth = max(depth, 2)  # a bigram partition root sits at depth 2
    with tempfile.TemporaryDirectory() as tmp:
        _, trie = make_store(Path(tmp), [text], depth, partition, budget=8)
        check_profile(trie)


def test_memory_estimate_formula() -> None:
    m = ModelShape()
    assert m.bytes_per_row(65) == 4 * (2 * (9 * 64 + 2 * 256) + 64 + 2 * 65) == 9480
    assert m.bytes_per_ctx() == 4 * 2 * 4
    assert ModelShape(d_model=128, n_layers=4, d_ff=512, n_heads=2).bytes_per_ctx() == 32


@pytest.mark.skipif(not TINY_SHAKESPEARE.is_file(), reason="shared tinyshakespeare.txt is absent")
def test_tinyshakespeare_depth_counts(tmp_path: Path) -> None:
    corpus, trie = str(tmp_path / "c.zarr"), str(tmp_path / "t.zarr")
    ingest([TINY_SHAKESPEARE], corpus, holdout=0.0)
    build_trie(corpus, trie, "radix", BuildConfig(max_depth=8, progress=False))
    d = profile(trie, by="depth", workers=2).depth
    assert d["nodes"].tolist()[:6] == [1, 65, 1403, 11556, 50712, 141021]
    assert d["nodes"].sum() == 1_545_083  # leveled nodes incl. root (SPEC §4)
    assert d["radix_edge_tokens"].sum() == 1_545_082


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]):
    """run_cli(*args) -> (exit code, stdout, stderr) of `agpt args...`, run in-process."""
    from agpt.cli import main

    def run(*args: object) -> tuple[int, str, str]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in args])
            raise SystemExit(0)
        out, err = capsys.readouterr()
        code = exc.value.code
        return (code if isinstance(code, int) else 0 if code is None else 1), out, err

    return run


@pytest.fixture
def stores(tmp_path: Path) -> tuple[str, str]:
    rng = random.Random(1)
    return make_store(tmp_path, ["".join(rng.choice("hello world\n") for _ in range(300))], 4)


def test_cli_profile_writes_csv_and_parquet(run_cli, stores, tmp_path: Path) -> None:
    _, trie = stores
    n_parts = open_trie(trie).n_partitions
    code, out, err = run_cli("profile", trie, "--csv", tmp_path / "p.csv", "--parquet",
                             tmp_path / "p.parquet", "--bins", 8)
    assert code == 0, err
    assert "per depth" in out and "per partition" in out and "mass histogram" in out
    for ext, read in (("csv", pd.read_csv), ("parquet", pd.read_parquet)):
        dep = read(tmp_path / f"p.depth.{ext}")
        part = read(tmp_path / f"p.partition.{ext}")
        assert dep["depth"].tolist() == list(range(5))
        assert part["partition"].tolist() == list(range(n_parts))
        assert [f"mass_h{i}" for i in range(8)] == [c for c in dep.columns if c.startswith("mass_h")]
        assert {"est_bytes", "rows", "entropy", "branching", "radix_nodes"} <= set(part.columns)
    code, out, err = run_cli("profile", trie, "--by", "partition", "--csv", tmp_path / "one.csv",
                             "--quiet", "--d-model", 128)
    assert code == 0, err
    assert out == ""
    one = pd.read_csv(tmp_path / "one.csv")
    assert len(one) == n_parts
    default = pd.read_csv(tmp_path / "p.partition.csv")
    assert (one["est_bytes"] > default["est_bytes"]).all()


def test_cli_profile_errors(run_cli, stores, tmp_path: Path) -> None:
    corpus, trie = stores
    code, out, err = run_cli("profile", corpus)
    assert code != 0 and "build-radix" in err
    for args in (["profile", corpus], ["profile", trie, "--bins", "1"],
                 ["profile", trie, "--csv", tmp_path / "no" / "such" / "p.csv"],
                 ["profile", tmp_path / "missing.zarr"]):
        code, out, err = run_cli(*args)
        assert code != 0, args
        assert "Traceback" not in err and err.strip().count("\n") == 0, err


def test_cli_info_both_kinds(run_cli, stores) -> None:
    corpus, trie = stores
    code, out, err = run_cli("info", trie)
    assert code == 0, err
    assert "agpt-trie version 1" in out and "radix (complete)" in out and "on disk" in out
    code, out, err = run_cli("info", trie, "--json")
    info = json.loads(out)
    t = open_trie(trie)
    assert info["format"] == "agpt-trie" and info["max_depth"] == 4
    assert info["partitions"]["count"] == t.n_partitions
    assert info["totals"] == t.totals()
    assert info["layers"] == {"radix": "complete", "leveled": "complete"}
    assert info["tokens"] == 300 and info["heldout_tokens"] == 0 and info["disk_bytes"] > 0
    code, out, err = run_cli("info", corpus)
    assert code == 0, err
    assert "corpus store" in out and "agpt-corpus" in out
    info = json.loads(run_cli("info", corpus, "--json")[1])
    c = open_corpus(corpus)
    assert info["corpus_sha256"] == c.corpus_sha256 and info["vocab_size"] == c.vocab_size
    assert "max_depth" not in info


def test_cli_info_refuses_missing_and_other_versions(run_cli, stores, tmp_path: Path) -> None:
    code, out, err = run_cli("info", tmp_path / "missing.zarr")
    assert code != 0 and "Traceback" not in err and err.count("\n") == 1
    assert "no store" in err
    corpus, trie = stores
    for url in (corpus, trie):
        g = zarr.open_group(url, mode="r+", zarr_format=3)
        meta = dict(g.attrs["agpt"])
        meta["format_version"] = 99
        g.attrs["agpt"] = meta
        code, out, err = run_cli("info", url)
        assert code != 0 and "Traceback" not in err and err.count("\n") == 1
        assert "format version 99" in err
    code, out, err = run_cli("profile", trie)
    assert code != 0 and "format version 99" in err and "Traceback" not in err
