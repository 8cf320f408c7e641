"""The compiled unit expansion and loss terms (agpt.train.expand) against their NumPy references."""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stores import assert_same_fields, make_trie

from agpt.store.trie import open_trie
from agpt.train.objective import Weighting, targets, targets_reference
from agpt.train.units import (
    Unit,
    UnitReader,
    _spine_rows,
    chunks,
    load_unit,
    radix_unit,
    radix_unit_reference,
    ranges,
    spine_chain,
    spine_unit,
    unit_count,
)

UNIT_FIELDS = ("token", "parent", "depth", "count_ptr", "count_token", "count_value", "loss")
WEIGHTINGS = [Weighting("linear", 0.0), Weighting("linear", 1.0), Weighting("log", 0.5),
              Weighting("sqrt", 2.0), Weighting("off", 0.0), Weighting("off", 3.0)]


def assert_same_targets(u: Unit, vocab: int) -> None:
    for w in WEIGHTINGS:
        a = targets(u.count_ptr, u.count_token, u.count_value, u.loss, vocab, w)
        b = targets_reference(u.count_ptr, u.count_token, u.count_value, u.loss, vocab, w)
        for f in ("rows", "row", "token"):
            assert getattr(a, f).dtype == getattr(b, f).dtype
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
        # libm and NumPy's vectorised log may differ in the last bit
        np.testing.assert_allclose(a.coef, b.coef, rtol=1e-14, atol=0)
        np.testing.assert_allclose(a.row_coef, b.row_coef, rtol=1e-14, atol=0)
        assert a.z == pytest.approx(b.z, rel=1e-13)


def check_store(url: str) -> None:
    t = open_trie(url)
    spine = t.spine()
    for p in range(t.n_partitions):
        rt = t.radix_partition(p)
        chain = spine_chain(spine, int(t.spine_parent_of_partition()[p]))
        ctx = _spine_rows(spine, chain, loss=False) if chain else None
        u = radix_unit(rt, ctx, "p")
        assert_same_fields(u, radix_unit_reference(rt, ctx, "p"), UNIT_FIELDS)
        assert_same_targets(u, t.vocab_size)
    s = spine_unit(spine)
    if s is not None:
        assert_same_targets(s, t.vocab_size)


@pytest.mark.parametrize("scheme", ["unigram", "bigram", "auto"])
def test_expansion_equals_reference(tmp_path: Path, scheme: str) -> None:
    rng = np.random.default_rng(3)
    text = "".join(rng.choice(list("abcde \n"), 3000))
    kw = {"partition_budget": 80} if scheme == "auto" else {}
    check_store(make_trie(tmp_path, [text], 9, scheme, **kw))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(alphabet="ab\nxyz", min_size=2, max_size=300), D=st.integers(1, 7),
       scheme=st.sampled_from(["unigram", "bigram", "auto"]))
def test_expansion_equals_reference_on_random_corpora(text: str, D: int, scheme: str) -> None:
    if scheme == "bigram" and D < 2:
        scheme = "unigram"
    kw = {"partition_budget": 10} if scheme == "auto" else {}
    with tempfile.TemporaryDirectory() as tmp:
        check_store(make_trie(Path(tmp), [text], D, scheme, **kw))


def test_loss_terms_edge_cases() -> None:
    """Rows with no counts, rows not flagged for loss, a one-token vocabulary."""
    ptr = np.array([0, 0, 2, 3, 3, 6])
    tok = np.array([0, 1, 1, 0, 0, 1])
    val = np.array([2, 5, 1, 0, 3, 4])           # one zero count inside a row
    loss = np.array([True, True, False, True, True])
    u = Unit("x", np.zeros(5, np.int64), np.full(5, -1), np.ones(5, np.int32), ptr, tok, val, loss)
    assert_same_targets(u, 2)
    assert_same_targets(u, 1)


def test_dense_loss_rows_give_the_same_loss_terms() -> None:
    """dense=True: the rows become one range, the gaps weigh 0 and have no terms; every real
    term keeps its row, token and coefficient."""
    rng = np.random.default_rng(5)
    n = 3000
    clen = rng.integers(1, 4, n)
    clen[[0, 1, 500, 2999]] = 0                  # rows with no successor (one at each end)
    ptr = np.concatenate([[0], np.cumsum(clen)])
    tok = rng.integers(0, 9, ptr[-1])
    val = rng.integers(1, 50, ptr[-1])
    loss = np.ones(n, bool)
    loss[:3] = False                             # context rows
    for w in WEIGHTINGS:
        s = targets(ptr, tok, val, loss, 9, w)
        d = targets(ptr, tok, val, loss, 9, w, dense=True)
        assert isinstance(d.rows, slice) and (d.rows.start, d.rows.stop) == (3, 2999)
        real = np.arange(d.rows.start, d.rows.stop)[d.row]
        np.testing.assert_array_equal(real, s.rows[s.row])
        np.testing.assert_array_equal(d.token, s.token)
        np.testing.assert_array_equal(d.coef, s.coef)
        dense_coef = np.zeros(d.rows.stop - d.rows.start)
        dense_coef[s.rows - d.rows.start] = s.row_coef
        np.testing.assert_array_equal(d.row_coef, dense_coef)
        assert d.z == pytest.approx(s.z, rel=1e-14)
    loss[1000:2000] = False                      # a long gap: stays sparse
    assert not isinstance(targets(ptr, tok, val, loss, 9, WEIGHTINGS[0], dense=True).rows, slice)


@pytest.mark.parametrize("blocks", ["none", "some", "all"])
def test_unit_reader_reads_blocks_of_the_order_and_equals_load_unit(tmp_path: Path,
                                                                    blocks: str) -> None:
    rng = np.random.default_rng(5)
    text = "".join(rng.choice(list("abcdefgh"), 600))
    t = open_trie(make_trie(tmp_path, [text], 7, "bigram"))
    n, P = unit_count(t), t.n_partitions
    rows = t.radix_rows()
    assert P > 8 and rows.sum() == t.totals()["radix_edge_tokens"]
    block_rows = {"none": 0, "some": 3 * int(np.median(rows)), "all": int(rows.sum())}[blocks]
    want = {i: load_unit(t, i) for i in range(n)}
    reads: list[tuple[int, int]] = []
    whole = t.radix_partitions
    t.radix_partitions = lambda a, b: reads.append((a, b)) or whole(a, b)
    orders = [list(range(n)), [int(i) for i in rng.permutation(n)],
              [i for i in range(n) if i % 3]]                       # gaps: units cached on the GPU
    for order in orders:
        reads.clear()
        reader = UnitReader(t, order, block_rows)
        with ThreadPoolExecutor(4) as ex:                            # loaders take units at once
            got = list(ex.map(reader.unit, order))
        for i, u in zip(order, got, strict=True):
            assert_same_fields(u, want[i], UNIT_FIELDS)
        assert not reader._blocks                                    # each block dropped
        # every partition read once, in runs of consecutive ones up to block_rows rows
        assert sorted(p for a, b in reads for p in range(a, b)) == sorted(i for i in order
                                                                          if i < P)
        for a, b in reads:
            assert b == a + 1 or rows[a:b].sum() <= block_rows
        if order == list(range(n)):
            assert len(reads) == {"none": P, "all": 1}.get(blocks) or 1 < len(reads) < P / 2


def _take(u: Unit, rows: np.ndarray, loss: np.ndarray) -> Unit:
    """Oracle of Unit.piece: the sub-forest of `rows` (sorted, closed under parent) by gathers."""
    new = np.full(u.n_rows, -1, dtype=np.int64)
    new[rows] = np.arange(len(rows))
    par = u.parent[rows]
    clen = np.diff(u.count_ptr)[rows]
    src = ranges(u.count_ptr[rows], clen)
    return Unit(u.name, u.token[rows], np.where(par >= 0, new[np.maximum(par, 0)], -1),
                u.depth[rows], np.concatenate(([0], np.cumsum(clen))), u.count_token[src],
                u.count_value[src], loss)


@pytest.mark.parametrize("max_rows", [9, 10, 37, 200])
def test_chunks_are_pieces_with_their_first_rows_ancestors(tmp_path: Path, max_rows: int) -> None:
    rng = np.random.default_rng(max_rows)
    t = open_trie(make_trie(tmp_path, ["".join(rng.choice(list("abc \n"), 400))], 8, "bigram"))
    for i in range(unit_count(t)):
        u = load_unit(t, i)
        covered = np.zeros(u.n_rows, int)
        start = 0
        for c in chunks(u, max_rows):
            assert c.n_rows <= max(max_rows, int(u.depth.max()))
            a = int(u.depth[start]) - 1 if c.n_rows < u.n_rows else 0   # its ancestors first
            rows = np.arange(start, start + c.n_rows - a)
            anc, r = [], int(u.parent[start]) if a else -1
            while r >= 0:
                anc.append(r)
                r = int(u.parent[r])
            full = np.concatenate([np.asarray(anc[::-1], np.int64), rows])
            want = _take(u, full, np.concatenate([np.zeros(a, bool), u.loss[rows]]))
            assert_same_fields(c, want, UNIT_FIELDS)
            covered[rows] += 1
            start += len(rows)
        assert (covered == 1).all()
