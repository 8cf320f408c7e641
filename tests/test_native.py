"""The compiled build kernels (agpt.trie.native) against plain NumPy references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from stores import RADIX_FIELDS, assert_same_fields, corpora, plan_starts

from agpt.store.format import token_dtype
from agpt.trie import native
from agpt.trie.keys import adjacent_lcp, gather_keys, sort_keys, sort_keys_reference
from agpt.trie.radix import radix_from_keys, radix_from_keys_reference


def lex_order(keys: np.ndarray) -> np.ndarray:
    return np.lexsort(keys.T[::-1])


@pytest.mark.parametrize("n", [0, 1, 2, 17, 100, 5000])
@pytest.mark.parametrize("spread", [1, 3, 1 << 20, 1 << 63])
def test_radix_argsort_u64(n: int, spread: int) -> None:
    rng = np.random.default_rng(n + spread % 1000)
    val = rng.integers(0, spread, n, dtype=np.uint64) + np.uint64(12345)
    ref = np.sort(val)
    v, o, pay = val.copy(), np.arange(n, dtype=np.int32), val * np.uint64(3)
    v2, o2, p2 = np.empty_like(v), np.empty_like(o), np.empty_like(pay)
    if native._argsort_u64(v, o, pay, v2, o2, p2):
        v, o, pay = v2, o2, p2
    np.testing.assert_array_equal(v, ref)
    np.testing.assert_array_equal(val[o], ref)
    np.testing.assert_array_equal(pay, ref * np.uint64(3))  # the payload travels along


@pytest.mark.parametrize("n", [0, 1, 5, 16, 17, 300, 4000])
def test_quicksort_pairs(n: int) -> None:
    rng = np.random.default_rng(n)
    for hi in (2, 50, 1 << 40):
        word = rng.integers(0, hi, n + 10, dtype=np.uint64)
        order = np.arange(n + 10, dtype=np.int32)
        orig = word.copy()
        native._qsort_pairs(word, order, 5, 5 + n)
        np.testing.assert_array_equal(word[5:5 + n], np.sort(orig[5:5 + n]))
        np.testing.assert_array_equal(orig[order], word)
        np.testing.assert_array_equal(word[:5], orig[:5])


@settings(max_examples=60, deadline=None)
@given(m=st.integers(0, 300), w=st.integers(1, 40), base=st.sampled_from([2, 3, 5, 76, 256, 70000]),
       n_seg=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_sort_segments_matches_lexsort(m: int, w: int, base: int, n_seg: int, seed: int) -> None:
    """Rows sort like np.lexsort within each segment, whatever the values and seg_depth
    claims (a wrong common-prefix claim must not break the order)."""
    rng = np.random.default_rng(seed)
    dt = np.uint8 if base <= 256 else np.uint32
    # few distinct values in the first columns make long ties
    keys = rng.integers(0, base, (m, w)).astype(dt)
    keys[:, : w // 2] %= dt(min(base, 2))
    seg_id = np.sort(rng.integers(0, n_seg, m)).astype(np.int32)
    rng.shuffle(seg_id)
    seg_depth = rng.integers(0, w + 2, n_seg).astype(np.int16)
    order, seg_ptr = native.sort_segments(keys, seg_id, seg_depth, base, native.digits_per_word(base))
    np.testing.assert_array_equal(seg_ptr, np.searchsorted(np.sort(seg_id), np.arange(n_seg + 1)))
    assert sorted(order.tolist()) == list(range(m))
    for g in range(n_seg):
        got = keys[order[seg_ptr[g]: seg_ptr[g + 1]]]
        assert np.all(seg_id[order[seg_ptr[g]: seg_ptr[g + 1]]] == g)
        want = keys[seg_id == g]
        np.testing.assert_array_equal(got, want[lex_order(want)])


@pytest.mark.parametrize("base", [2, 10, 11, 76, 256, 65537, 1 << 32])
def test_digits_per_word(base: int) -> None:
    p = native.digits_per_word(base)
    assert base ** p <= 1 << 64 < base ** (p + 1)


def test_adjacent_lcp_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    keys = np.sort(rng.integers(1, 3, (2000, 9)).astype(np.uint8).view("S9").ravel()).view(np.uint8)
    keys = keys.reshape(-1, 9).copy()
    klen = rng.integers(1, 10, len(keys)).astype(np.uint8)
    np.testing.assert_array_equal(native.adjacent_lcp(keys, klen), adjacent_lcp(keys, klen))


def _radix_inputs(tokens: np.ndarray, docs: list[tuple[int, int]], D: int, scheme: str,
                  budget: int | None):
    starts, ends, plan, pid, V = plan_starts(tokens, docs, D, scheme, budget)
    keep = np.flatnonzero(pid >= 0)
    rng = np.random.default_rng(len(tokens))
    keep = keep[rng.permutation(len(keep))]  # the kernels must not rely on any input order
    keys, klen = gather_keys(tokens, starts[keep], ends[keep], D, V)
    plen = np.array([len(p) for p in plan.prefixes], np.int16)
    return keys, klen, pid[keep].astype(np.int32), plen, V


def _check_same(tokens, docs, D, scheme, budget=None):
    keys, klen, pid, plen, V = _radix_inputs(tokens, docs, D, scheme, budget)
    a = sort_keys_reference(keys.copy(), klen.copy(), None, pid.copy(), plen)
    b = sort_keys(keys.copy(), klen.copy(), None, pid.copy(), plen)
    np.testing.assert_array_equal(a.keys, b.keys)
    np.testing.assert_array_equal(a.klen, b.klen)
    np.testing.assert_array_equal(a.lcp, b.lcp)
    np.testing.assert_array_equal(a.seg_ptr, b.seg_ptr)
    ra = radix_from_keys_reference(a, token_dtype(V))
    rb = radix_from_keys(b, token_dtype(V))
    assert_same_fields(ra, rb, RADIX_FIELDS)


@settings(max_examples=150, deadline=None)
@given(c=corpora(5, 120, 4), D=st.integers(1, 14), scheme=st.sampled_from(["unigram", "bigram", "auto"]),
       budget=st.integers(1, 40))
def test_radix_matches_reference(c, D: int, scheme: str, budget: int) -> None:
    tokens, docs = c
    if scheme == "bigram" and D < 2:
        scheme = "unigram"
    _check_same(tokens.astype(np.uint8), docs, D, scheme, budget)


def test_radix_matches_reference_wide_vocabulary() -> None:
    """uint16 keys and tokens (V > 255), and a key dtype wider than the token dtype (V = 256)."""
    rng = np.random.default_rng(7)
    for V in (256, 300):
        tokens = rng.integers(0, 3, 3000).astype(np.int64) * (V // 3) + (V - 1) * (rng.random(3000) < 0.1)
        tokens = np.minimum(tokens, V - 1).astype(np.uint16)
        tokens[0] = V - 1
        _check_same(tokens, [(0, 1000), (1000, 3000)], 12, "auto", 200)


def test_radix_matches_reference_tinyshakespeare(tiny_shakespeare: Path) -> None:
    text = tiny_shakespeare.read_text()
    chars = sorted(set(text))
    lut = np.zeros(max(map(ord, chars)) + 1, np.uint8)
    lut[[ord(ch) for ch in chars]] = np.arange(len(chars))
    tokens = lut[np.frombuffer(text.encode("utf-32-le"), np.uint32)][:300_000]
    _check_same(tokens, [(0, len(tokens))], 32, "auto", 20_000)
