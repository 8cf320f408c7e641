"""Sorted context keys: the sorted-array form of a (sub)trie.

Every start position i of the training stream contributes one key: the next D+1 tokens
t[i..i+D], stored as ids+1 with 0 as padding past the end of its document. Sorting the keys
lexicographically and taking adjacent longest-common-prefix (LCP) lengths gives the trie:
the nodes at depth k are the runs of keys that share a k-token prefix (SPEC §6).
The (D+1)-th token is kept so that depth-D nodes get their next-token counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agpt.store.format import token_dtype


@dataclass
class SortedKeys:
    """Keys of one or more partitions, sorted; partitions are contiguous key ranges."""

    keys: np.ndarray      # (m, D+1) ids+1, 0 = past the document end; sorted rows
    klen: np.ndarray      # (m,) real tokens in each key = min(tokens left in document, D+1)
    start: np.ndarray | None  # (m,) corpus position of each key (None: not tracked)
    lcp: np.ndarray       # (m+1,) int16; lcp[p] = LCP(key p-1, key p); -1 at partition edges
    seg_ptr: np.ndarray   # (S+1,) key offsets of the partitions (segments)
    seg_depth: np.ndarray  # (S,) depth of each partition's root prefix (>= 1)

    @property
    def max_depth(self) -> int:
        return self.keys.shape[1] - 1


def key_dtype(vocab_size: int) -> np.dtype:
    """Dtype of a key cell: ids are shifted by one so that 0 can mean 'past the end'."""
    return token_dtype(vocab_size + 1)


def gather_keys(tokens: np.ndarray, starts: np.ndarray, doc_end: np.ndarray, depth: int,
                vocab_size: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Keys (ids+1, padded) and their real lengths for `starts` (absolute positions).

    `tokens` holds t[offset : offset+len]; it must extend to min(doc_end, start+D+1) for every
    start. `doc_end` is the end of each start's document (exclusive, absolute).
    """
    w = depth + 1
    kd = key_dtype(vocab_size)
    padded = np.zeros(tokens.shape[0] + w, dtype=kd)
    np.add(tokens, 1, out=padded[: tokens.shape[0]], dtype=kd, casting="unsafe")
    rel = np.asarray(starts, dtype=np.int64) - offset
    keys = np.lib.stride_tricks.sliding_window_view(padded, w)[rel]
    klen = np.minimum(np.asarray(doc_end, dtype=np.int64) - starts, w)
    short = np.flatnonzero(klen < w)
    if short.size:  # blank what lies past each document's end (few rows: D per document)
        cols = np.arange(w)
        keys[short] = np.where(cols[None, :] < klen[short, None], keys[short], 0)
    return keys, klen


def sort_keys(keys: np.ndarray, klen: np.ndarray, start: np.ndarray | None, seg_id: np.ndarray,
              seg_depth: np.ndarray) -> SortedKeys:
    """Sort keys by (partition, key) and compute adjacent LCPs (compiled kernels).

    The caller may pass its only references to the arrays (the unsorted keys are then freed
    as soon as the sorted copy exists); `start` may be None when positions are not needed.
    Partition prefixes are disjoint and numbered in lexicographic order, so sorting the keys
    also groups them by partition, in partition order. Equal keys are interchangeable (only
    their start positions differ), so their order is left unspecified.
    """
    from agpt.trie import native

    m, w = keys.shape
    keys = np.ascontiguousarray(keys)
    base = max(int(keys.max(initial=0)) + 1, 2)
    seg_depth = np.asarray(seg_depth, dtype=np.int16)
    if m and (seg_id.min() < 0 or seg_id.max() >= len(seg_depth)):
        raise ValueError("partition ids must index seg_depth")
    order, seg_ptr = native.sort_segments(keys, np.asarray(seg_id), seg_depth, base,
                                          native.digits_per_word(base))
    keys = native.take_rows(keys, order)
    klen = klen[order]
    start = start[order] if start is not None else None
    del order
    _check_partition_order(keys, seg_ptr)
    lcp = np.full(m + 1, -1, dtype=np.int16)
    if m > 1:
        lcp[1:m] = native.adjacent_lcp(keys, klen)
        lcp[seg_ptr[1:-1]] = -1  # no run crosses a partition edge
    return SortedKeys(keys, klen, start, lcp, seg_ptr, seg_depth)


def _check_partition_order(keys: np.ndarray, seg_ptr: np.ndarray) -> None:
    """The last key of each partition must sort before the first key of the next one."""
    edge = seg_ptr[1:-1]
    edge = edge[(edge > 0) & (edge < keys.shape[0])]
    if edge.size == 0:
        return
    a, b = keys[edge - 1], keys[edge]
    ne = a != b
    col = ne.argmax(axis=1)
    rows = np.arange(len(edge))
    if np.any(~ne.any(axis=1) | (a[rows, col] > b[rows, col])):
        raise ValueError("partition ids must follow the lexicographic order of their prefixes")


def _finish_sort(keys: np.ndarray, klen: np.ndarray, start: np.ndarray | None,
                 seg_id: np.ndarray, seg_depth: np.ndarray, order: np.ndarray,
                 lcp_fn) -> SortedKeys:
    m = keys.shape[0]
    n_seg = len(seg_depth)
    keys = keys[order]
    klen = klen[order]
    start = start[order] if start is not None else None
    seg_id = seg_id[order]
    del order
    if m and np.any(np.diff(seg_id) < 0):
        raise ValueError("partition ids must follow the lexicographic order of their prefixes")
    seg_ptr = np.searchsorted(seg_id, np.arange(n_seg + 1))
    lcp = np.full(m + 1, -1, dtype=np.int16)
    if m > 1:
        lcp[1:m] = lcp_fn(keys, klen)
        lcp[seg_ptr[1:-1]] = -1  # no run crosses a partition edge
    return SortedKeys(keys, klen, start, lcp, seg_ptr, np.asarray(seg_depth, dtype=np.int16))


def sort_keys_reference(keys: np.ndarray, klen: np.ndarray, start: np.ndarray | None,
                        seg_id: np.ndarray, seg_depth: np.ndarray) -> SortedKeys:
    """`sort_keys` in plain NumPy (the oracle of the compiled kernels' tests).

    Rows compare as big-endian byte strings (memcmp order equals lexicographic token order).
    """
    m, w = keys.shape
    be = keys.astype(keys.dtype.newbyteorder(">"), copy=False)
    raw = np.ascontiguousarray(be).view(f"S{w * keys.dtype.itemsize}").ravel()
    order = np.argsort(raw)
    del raw, be
    return _finish_sort(keys, klen, start, seg_id, seg_depth, order, adjacent_lcp)


def adjacent_lcp(keys: np.ndarray, klen: np.ndarray, block: int = 1 << 18) -> np.ndarray:
    """LCP of each sorted key with its predecessor, capped at both keys' real lengths."""
    m, w = keys.shape
    out = np.empty(m - 1, dtype=np.int16)
    for lo in range(1, m, block):
        hi = min(m, lo + block)
        eq = keys[lo:hi] == keys[lo - 1: hi - 1]
        first_diff = np.where(eq.all(axis=1), w, eq.argmin(axis=1))
        out[lo - 1: hi - 1] = np.minimum(first_diff, np.minimum(klen[lo:hi], klen[lo - 1: hi - 1]))
    return out
