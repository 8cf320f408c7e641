"""Compiled (numba) kernels of the trie build: key sort, adjacent LCPs, radix construction.

The NumPy formulations (`keys.sort_keys_reference`, `radix.radix_from_keys_reference`) sort
33-byte rows with a generic comparison sort and build the radix trie in D level-by-level passes;
at 100 MB of corpus that is ~1 CPU-µs per position. These kernels do the same work in a few
linear passes: keys are packed into 64-bit words (base-(V+1) digits, so integer order is token
order), sorted by their first word with an LSD radix sort and tie groups refined word by word;
the radix trie is read off the sorted keys with one stack pass over the LCP array (the classic
bottom-up LCP-interval traversal). They release the GIL, so Dask's threads run them in parallel.
Their output is byte-identical to the NumPy reference (tests/test_native.py).

Compiled functions are cached on disk (numba cache=True): the first build after an install
compiles them once (a few seconds); later processes load them in a fraction of a second.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# --------------------------------------------------------------------------------------------
# Sorting
# --------------------------------------------------------------------------------------------


def digits_per_word(base: int) -> int:
    """How many base-`base` digits fit in a uint64 (base**P - 1 <= 2**64 - 1)."""
    p = 1
    while base ** (p + 1) <= 1 << 64:
        p += 1
    return p


@njit(nogil=True, cache=True)
def _argsort_u64(val, order, pay, val2, order2, pay2):
    """Sort `val` in place with an LSD radix sort on 11-bit digits, carrying `order` and
    `pay` along; digits equal for every element are skipped, so a narrow value range costs
    few passes. val2/order2/pay2 are scratch of the same size. Returns True when the result
    ended up in the scratch arrays (an odd number of passes)."""
    n = val.shape[0]
    if n < 2:
        return False
    lo = val[0]
    for i in range(n):
        if val[i] < lo:
            lo = val[i]
    nd = 6
    hist = np.zeros((nd, 2048), np.int64)
    for i in range(n):
        x = val[i] - lo
        val[i] = x
        for d in range(nd):
            hist[d, (x >> np.uint64(11 * d)) & np.uint64(2047)] += 1
    off = np.empty(2048, np.int64)
    swapped = False
    for d in range(nd):
        h = hist[d]
        skip = False
        for c in range(2048):
            if h[c] == n:
                skip = True
                break
            if h[c] != 0:
                break
        if skip:
            continue
        acc = 0
        for c in range(2048):
            off[c] = acc
            acc += h[c]
        sh = np.uint64(11 * d)
        for i in range(n):
            x = val[i]
            c = (x >> sh) & np.uint64(2047)
            k = off[c]
            off[c] = k + 1
            val2[k] = x
            order2[k] = order[i]
            pay2[k] = pay[i]
        val, val2 = val2, val
        order, order2 = order2, order
        pay, pay2 = pay2, pay
        swapped = not swapped
    for i in range(n):
        val[i] += lo
    return swapped


@njit(nogil=True, cache=True)
def _qsort_pairs(word, order, lo, hi):
    """Sort word[lo:hi] ascending, permuting order[lo:hi] alike (quicksort with median-of-3,
    insertion sort below 16 elements, explicit stack: the smaller side is pushed)."""
    st_lo = np.empty(64, np.int64)
    st_hi = np.empty(64, np.int64)
    top = 0
    st_lo[0], st_hi[0] = lo, hi
    while top >= 0:
        a, b = st_lo[top], st_hi[top]
        top -= 1
        while b - a > 16:
            mid = (a + b) // 2
            x0, x1, x2 = word[a], word[mid], word[b - 1]
            if x0 > x1:
                x0, x1 = x1, x0
            if x1 > x2:
                x1 = x2
                if x0 > x1:
                    x1 = x0
            piv = x1
            i, j = a, b - 1
            while i <= j:
                while word[i] < piv:
                    i += 1
                while word[j] > piv:
                    j -= 1
                if i <= j:
                    word[i], word[j] = word[j], word[i]
                    order[i], order[j] = order[j], order[i]
                    i += 1
                    j -= 1
            if j + 1 - a < b - i:
                if a < j + 1:
                    top += 1
                    st_lo[top], st_hi[top] = a, j + 1
                a = i
            else:
                if i < b:
                    top += 1
                    st_lo[top], st_hi[top] = i, b
                b = j + 1
        for k in range(a + 1, b):
            x, r = word[k], order[k]
            q = k - 1
            while q >= a and word[q] > x:
                word[q + 1] = word[q]
                order[q + 1] = order[q]
                q -= 1
            word[q + 1] = x
            order[q + 1] = r


@njit(nogil=True, cache=True)
def _pack(keys, r, c0, c1, b):
    x = np.uint64(0)
    for c in range(c0, c1):
        x = x * b + np.uint64(keys[r, c])
    return x


def sort_segments(keys: np.ndarray, seg_id: np.ndarray, seg_depth: np.ndarray, base: int,
                  per_word: int) -> tuple[np.ndarray, np.ndarray]:
    """Row order sorting the keys by (segment, key), and the segments' offsets in it.

    Large buffers are allocated here with NumPy (which asks for transparent huge pages):
    first-touch page faults of 4 KiB pages cost more than the sort itself on the build VMs.
    """
    m = keys.shape[0]
    order = np.empty(m, np.int32)
    bufs = (np.empty(m, np.uint64), np.empty(m, np.uint64), np.empty(m, np.uint64),
            np.empty(m, np.uint64), np.empty(m, np.int32))
    seg_ptr = _sort_segments(keys, seg_id, seg_depth, base, per_word, order, *bufs)
    return order, seg_ptr


@njit(nogil=True, cache=True)
def _refine_group(keys, order, word, lo, hi, col, per_word, b, st_lo, st_hi, st_col):
    """Sort rows order[lo:hi] (equal in their columns before `col`) by columns col.., one
    packed word at a time, depth first; word[lo:hi] is scratch."""
    w = keys.shape[1]
    top = 0
    st_lo[0], st_hi[0], st_col[0] = lo, hi, col
    while top >= 0:
        lo, hi, col = st_lo[top], st_hi[top], st_col[top]
        top -= 1
        col1 = min(col + per_word, w)
        for k in range(lo, hi):
            word[k] = _pack(keys, order[k], col, col1, b)
        _qsort_pairs(word, order, lo, hi)
        if col1 >= w:
            continue
        k = lo
        while k < hi:
            q = k + 1
            while q < hi and word[q] == word[k]:
                q += 1
            if q - k > 1:
                if top + 1 == st_lo.shape[0]:
                    st_lo = np.concatenate((st_lo, st_lo))
                    st_hi = np.concatenate((st_hi, st_hi))
                    st_col = np.concatenate((st_col, st_col))
                top += 1
                st_lo[top], st_hi[top], st_col[top] = k, q, col1
            k = q
    return st_lo, st_hi, st_col


@njit(nogil=True, cache=True)
def _sort_segments(keys, seg_id, seg_depth, base, per_word, order, word, word1, word_s,
                   word1_s, order_s):
    """Row order sorting the keys by (segment, key); ties are equal rows (order unspecified).

    Rows are grouped by segment (counting sort). In each segment the first two words (the
    `per_word` columns after the segment's common prefix, seg_depth, and the next ones, as
    base-`base` numbers) are packed in row order; the rows are radix-sorted by the first
    word carrying the second along, runs of equal first words are sorted by the second
    (sequential memory), and only runs still tied read further columns. Fills `order`
    (word* are scratch), returns seg_ptr.
    """
    m, w = keys.shape
    n_seg = seg_depth.shape[0]
    b = np.uint64(base)
    seg_ptr = np.zeros(n_seg + 1, np.int64)
    for i in range(m):
        seg_ptr[seg_id[i] + 1] += 1
    for g in range(n_seg):
        seg_ptr[g + 1] += seg_ptr[g]
    fill = seg_ptr[:-1].copy()
    for i in range(m):
        g = seg_id[i]
        order[fill[g]] = i
        fill[g] += 1
    st_lo = np.empty(64, np.int64)
    st_hi = np.empty(64, np.int64)
    st_col = np.empty(64, np.int64)
    for g in range(n_seg):
        a, z = seg_ptr[g], seg_ptr[g + 1]
        if z - a < 2:
            continue
        c0 = min(max(int(seg_depth[g]), 0), w)
        r0 = order[a]
        for k in range(a + 1, z):  # the segment's rows must share their first c0 columns
            r = order[k]
            for c in range(c0):
                if keys[r, c] != keys[r0, c]:
                    c0 = c
                    break
        c1 = min(c0 + per_word, w)
        c2 = min(c1 + per_word, w)
        for k in range(a, z):
            r = order[k]
            word[k] = _pack(keys, r, c0, c1, b)
            word1[k] = _pack(keys, r, c1, c2, b)
        if z - a <= 64:
            st_lo, st_hi, st_col = _refine_group(keys, order, word, a, z, c0, per_word, b,
                                                 st_lo, st_hi, st_col)
            continue
        if _argsort_u64(word[a:z], order[a:z], word1[a:z], word_s[a:z], order_s[a:z],
                        word1_s[a:z]):
            word[a:z] = word_s[a:z]
            order[a:z] = order_s[a:z]
            word1[a:z] = word1_s[a:z]
        if c1 >= w:
            continue
        i = a
        while i < z:  # runs of equal first words: sort by the second, then refine ties
            j = i + 1
            while j < z and word[j] == word[i]:
                j += 1
            if j - i > 1:
                _qsort_pairs(word1, order, i, j)
                if c2 < w:
                    k = i
                    while k < j:
                        q = k + 1
                        while q < j and word1[q] == word1[k]:
                            q += 1
                        if q - k > 1:
                            st_lo, st_hi, st_col = _refine_group(
                                keys, order, word_s, k, q, c2, per_word, b, st_lo, st_hi, st_col)
                        k = q
            i = j
    return seg_ptr


def take_rows(keys: np.ndarray, order: np.ndarray) -> np.ndarray:
    """keys[order] (a compiled row gather: NumPy's fancy indexing of short rows is slow)."""
    out = np.empty((order.shape[0], keys.shape[1]), keys.dtype)
    _take_rows(keys, order, out)
    return out


@njit(nogil=True, cache=True)
def _take_rows(keys, order, out):
    w = keys.shape[1]
    for i in range(order.shape[0]):
        r = order[i]
        for c in range(w):
            out[i, c] = keys[r, c]


@njit(nogil=True, cache=True)
def adjacent_lcp(keys, klen):
    """LCP of each (sorted) key with its predecessor, capped at both keys' real lengths."""
    m, w = keys.shape
    out = np.empty(max(m - 1, 0), np.int16)
    for p in range(1, m):
        cap = min(klen[p], klen[p - 1])
        c = 0
        while c < cap and keys[p, c] == keys[p - 1, c]:
            c += 1
        out[p - 1] = c
    return out


# --------------------------------------------------------------------------------------------
# Radix construction
# --------------------------------------------------------------------------------------------


def radix_core(keys: np.ndarray, klen: np.ndarray, lcp: np.ndarray, seg_ptr: np.ndarray,
               seg_depth: np.ndarray, depth: int) -> tuple[np.ndarray, ...]:
    """Radix nodes of sorted keys, in depth-first preorder (see radix.radix_from_keys).

    One pass per partition (segment) over the boundaries between adjacent keys, with a stack
    of open LCP intervals (values strictly increasing, so at most D+2 deep). An interval
    opens when the LCP rises, closes when it falls below its value; a key whose path is
    longer than both its LCPs is a leaf of its own. Boundaries whose LCP equals the open
    interval's value split its keys into runs, i.e. its next-token counts. Nodes get ids as
    they are created; preorder (by first key, ancestors first) is a counting sort by first
    key of the reversed closing order (a node closes before its ancestors).

    Returns, in preorder: parent (int64, -1 for a partition root), head (int16), end depth
    (int16), first key (int32), mass (int64), count_ptr (int64), count tokens (key values),
    count values (int64). Buffers are NumPy-allocated (see sort_segments).
    """
    m = keys.shape[0]
    cap = 2 * m + 1
    nodes = np.empty((7, cap), np.int32)   # s, e, parent, head, c0, clen, closed
    n_v = np.empty(cap, np.int16)
    cap_c = 3 * m + 1
    c_tok = np.empty(cap_c, keys.dtype)
    c_val = np.empty(cap_c, np.int32)
    splits = np.empty((3, m + 1), np.int32)  # split boundary, previous split, run scratch
    nn, nc = _radix_pass(keys, klen, lcp, np.asarray(seg_ptr, np.int64),
                         np.asarray(seg_depth, np.int16), depth, nodes, n_v, c_tok, c_val, splits)
    del splits
    parent = np.empty(nn, np.int64)
    head = np.empty(nn, np.int16)
    end = np.empty(nn, np.int16)
    first = np.empty(nn, np.int32)
    mass = np.empty(nn, np.int64)
    count_ptr = np.empty(nn + 1, np.int64)
    ctok = np.empty(nc, keys.dtype)
    cval = np.empty(nc, np.int64)
    pre = np.empty(nn, np.int32)
    _radix_order(m, nn, nodes, n_v, c_tok, c_val, pre, parent, head, end, first, mass,
                 count_ptr, ctok, cval)
    return parent, head, end, first, mass, count_ptr, ctok, cval


@njit(nogil=True, cache=True)
def _emit_leaf(keys, q, path, parent, head, nn, nc, nodes, n_v, c_tok, c_val, ncl):
    x = nn
    nodes[0, x] = q
    nodes[1, x] = q
    nodes[2, x] = parent
    nodes[3, x] = head
    n_v[x] = path
    nodes[4, x] = nc
    tok = keys[q, path]
    if tok != 0:
        c_tok[nc] = tok
        c_val[nc] = 1
        nc += 1
    nodes[5, x] = nc - nodes[4, x]
    nodes[6, ncl] = x
    return nc


@njit(nogil=True, cache=True)
def _radix_pass(keys, klen, lcp, seg_ptr, seg_depth, D, nodes, n_v, c_tok, c_val, splits):
    """The stack pass of radix_core: nodes (creation order) and their counts; returns the
    numbers of nodes and count entries. nodes[6] lists node ids in closing order."""
    n_s, n_e, n_par, n_head, n_c0, n_cl, closed = (nodes[0], nodes[1], nodes[2], nodes[3],
                                                   nodes[4], nodes[5], nodes[6])
    sp_pos, sp_prev, runs = splits[0], splits[1], splits[2]
    st_id = np.empty(D + 3, np.int32)
    st_v = np.empty(D + 3, np.int32)
    st_lb = np.empty(D + 3, np.int32)
    st_sp = np.empty(D + 3, np.int32)   # newest split of the open interval (-1: none)
    st_ns = np.empty(D + 3, np.int32)   # number of splits
    nn = 0
    nc = 0
    ncl = 0
    nsp = 0
    for g in range(seg_ptr.shape[0] - 1):
        a = seg_ptr[g]
        b = seg_ptr[g + 1]
        if a >= b:
            continue
        root_head = seg_depth[g]
        sp = 0
        st_id[0] = -1
        st_v[0] = -1
        for p in range(a + 1, b + 1):
            if p < b:
                lp = lcp[p]
                ell = min(lp, D)
            else:
                lp = -1
                ell = -1
            q = p - 1
            left = min(lcp[q], D) if q > a else -1
            path = min(klen[q], D)
            leaf = path > max(left, ell)
            if leaf and left >= ell:  # a leaf below the open interval (value `left`)
                par = st_id[sp]
                nc = _emit_leaf(keys, q, path, par, root_head if par < 0 else st_v[sp] + 1,
                                nn, nc, nodes, n_v, c_tok, c_val, ncl)
                nn += 1
                ncl += 1
            last_lb = q
            last_id = -1
            while ell < st_v[sp]:  # close the intervals deeper than ell
                x = st_id[sp]
                v = st_v[sp]
                s0 = st_lb[sp]
                n_e[x] = q
                k = st_ns[sp]
                runs[0] = s0
                t = st_sp[sp]
                for r in range(k, 0, -1):
                    runs[r] = sp_pos[t]
                    t = sp_prev[t]
                n_c0[x] = nc
                for r in range(k + 1):
                    r0 = runs[r]
                    r1 = runs[r + 1] if r < k else q + 1
                    tok = keys[r0, v]
                    if tok != 0:
                        c_tok[nc] = tok
                        c_val[nc] = r1 - r0
                        nc += 1
                n_cl[x] = nc - n_c0[x]
                closed[ncl] = x
                ncl += 1
                last_lb = s0
                last_id = x
                sp -= 1
                if st_v[sp] >= ell:
                    n_par[x] = st_id[sp]
                    n_head[x] = root_head if st_id[sp] < 0 else st_v[sp] + 1
            if ell > st_v[sp]:  # open an interval of value ell (parent of the last closed)
                x = nn
                nn += 1
                n_s[x] = last_lb
                n_v[x] = ell
                if last_id >= 0:
                    n_par[last_id] = x
                    n_head[last_id] = ell + 1
                sp += 1
                st_id[sp] = x
                st_v[sp] = ell
                st_lb[sp] = last_lb
                st_sp[sp] = -1
                st_ns[sp] = 0
            if p < b and (ell < D or lp == D):  # boundary p splits the open interval's keys
                sp_pos[nsp] = p
                sp_prev[nsp] = st_sp[sp]
                st_sp[sp] = nsp
                st_ns[sp] += 1
                nsp += 1
            if leaf and left < ell:  # a leaf below the interval just opened
                nc = _emit_leaf(keys, q, path, st_id[sp], ell + 1, nn, nc, nodes, n_v,
                                c_tok, c_val, ncl)
                nn += 1
                ncl += 1
    return nn, nc


@njit(nogil=True, cache=True)
def _radix_order(m, n, nodes, n_v, c_tok, c_val, pre, parent, head, end, first, mass,
                 count_ptr, ctok, cval):
    """Second pass of radix_core: preorder ranks, then every output array in preorder."""
    n_s, n_e, n_par, n_head, n_c0, n_cl, closed = (nodes[0], nodes[1], nodes[2], nodes[3],
                                                   nodes[4], nodes[5], nodes[6])
    off = np.zeros(m + 1, np.int64)
    for x in range(n):
        off[n_s[x] + 1] += 1
    for i in range(m):
        off[i + 1] += off[i]
    for j in range(n - 1, -1, -1):
        x = closed[j]
        k = off[n_s[x]]
        off[n_s[x]] = k + 1
        pre[x] = k
    count_ptr[0] = 0
    for x in range(n):
        y = pre[x]
        px = n_par[x]
        parent[y] = -1 if px < 0 else pre[px]
        head[y] = n_head[x]
        end[y] = n_v[x]
        first[y] = n_s[x]
        count_ptr[y + 1] = n_cl[x]
    for y in range(n):
        count_ptr[y + 1] += count_ptr[y]
    for x in range(n):
        y = pre[x]
        d = count_ptr[y]
        c0 = n_c0[x]
        tot = 0
        for c in range(n_cl[x]):
            ctok[d + c] = c_tok[c0 + c]
            cval[d + c] = c_val[c0 + c]
            tot += c_val[c0 + c]
        # an edge longer than one token has every key of its node at its head; a one-token
        # edge's head is its endpoint, whose mass is the sum of its counts
        if n_v[x] - n_head[x] + 1 > 1:
            mass[y] = n_e[x] - n_s[x] + 1
        else:
            mass[y] = tot


@njit(nogil=True, cache=True)
def gather_edges(keys, row, head, end, edge_ptr, out):
    """out[edge_ptr[x] + j] = keys[row[x], head[x] - 1 + j] - 1 for j < end[x] - head[x] + 1."""
    for x in range(row.shape[0]):
        r = row[x]
        d = edge_ptr[x]
        for c in range(head[x] - 1, end[x]):
            out[d] = keys[r, c] - 1
            d += 1


def warm_up(key_dtype: np.dtype, klen_dtype: np.dtype, token_dtype: np.dtype, depth: int) -> None:
    """Load (or compile) the kernels for these dtypes on a tiny input.

    Loading the first compiled function initialises numba (~0.5 s, more than the kernels
    save on a 1 MB corpus); a build calls this on a background thread while it plans, so
    that the first task does not wait for it.
    """
    from agpt.trie.keys import sort_keys
    from agpt.trie.radix import radix_from_keys

    keys = np.zeros((3, depth + 1), key_dtype)
    keys[:, 0] = 1
    keys[1:, 1] = 1
    klen = np.array([1, depth + 1, depth + 1], klen_dtype)
    sk = sort_keys(keys, klen, None, np.zeros(3, np.int32), np.zeros(1, np.int16))
    radix_from_keys(sk, np.dtype(token_dtype))


# --------------------------------------------------------------------------------------------
# Plan and bucket passes over token chunks
# --------------------------------------------------------------------------------------------


@njit(nogil=True, cache=True)
def count_prefixes(tokens, seg_lo, seg_hi, seg_end, kmax, V, bins, bin_off):
    """Add the counts of the k-grams (k = 1..kmax) that begin at every start position.

    Starts are tokens[seg_lo[s]:seg_hi[s]] of each document piece s, whose document ends at
    seg_end[s] (a k-gram must fit in it); the k-gram with base-V code c is counted in
    bins[bin_off[k-1] + c]. One pass counts every level (the plan needs them all).
    """
    for s in range(seg_lo.shape[0]):
        for i in range(seg_lo[s], seg_hi[s]):
            L = min(seg_end[s] - i, kmax)
            code = 0
            for k in range(L):
                code = code * V + tokens[i + k]
                bins[bin_off[k] + code] += 1


@njit(nogil=True, cache=True)
def count_children(tokens, seg_lo, seg_hi, seg_end, k, V, parents, bins):
    """Add the counts of the k-grams that begin at every start and extend one of `parents`
    (sorted codes of (k-1)-grams): the k-gram (parents[j], t) is counted in bins[j * V + t]."""
    n_par = parents.shape[0]
    if n_par == 0:
        return
    for s in range(seg_lo.shape[0]):
        for i in range(seg_lo[s], min(seg_hi[s], seg_end[s] - k + 1)):
            code = 0
            for j in range(k - 1):
                code = code * V + tokens[i + j]
            j = np.searchsorted(parents, code)
            if j < n_par and parents[j] == code:
                bins[j * V + tokens[i + k - 1]] += 1


@njit(nogil=True, cache=True)
def assign_pieces(tokens, seg_lo, seg_hi, seg_end, dense, dense_off, codes, vals, code_off,
                  V, depth, pid):
    """Partition id of every start (in piece order), as plan.assign computes it.

    Prefix length k (1 <= k <= len(code_off) - 1) is looked up in a dense table when
    dense_off[k-1] >= 0: dense[dense_off[k-1] + code]; otherwise by binary search in the
    sorted codes[code_off[k-1]:code_off[k]] with values vals[...]. A value is the partition
    id, -2 for a split prefix (read one more token) or -1 (no partition: the start ends in
    the spine, or the prefix is absent).
    """
    kmax = code_off.shape[0] - 1
    at = 0
    for s in range(seg_lo.shape[0]):
        for i in range(seg_lo[s], seg_hi[s]):
            L = min(seg_end[s] - i, depth + 1)
            code = 0
            r = -1
            for k in range(1, kmax + 1):
                if L < k:
                    r = -1
                    break
                code = code * V + tokens[i + k - 1]
                if dense_off[k - 1] >= 0:
                    r = dense[dense_off[k - 1] + code]
                else:
                    a, b = code_off[k - 1], code_off[k]
                    j = a + np.searchsorted(codes[a:b], code)
                    r = vals[j] if j < b and codes[j] == code else -1
                if r != -2:
                    break
            pid[at] = r if r >= 0 else -1
            at += 1


@njit(nogil=True, cache=True)
def scatter_keys(tokens, seg_lo, seg_hi, seg_end, pid, ptr, depth, keys, klen):
    """Write each start's key (tokens + 1, 0 past its document's end) and real length to the
    rows of its partition: partition p gets rows ptr[p] .. ptr[p+1]-1, in start order."""
    w = depth + 1
    fill = ptr[:-1].copy()
    at = 0
    for s in range(seg_lo.shape[0]):
        for i in range(seg_lo[s], seg_hi[s]):
            p = pid[at]
            at += 1
            if p < 0:
                continue
            r = fill[p]
            fill[p] = r + 1
            L = min(seg_end[s] - i, w)
            for c in range(L):
                keys[r, c] = tokens[i + c] + 1
            for c in range(L, w):
                keys[r, c] = 0
            klen[r] = L


@njit(nogil=True, cache=True)
def scatter_positions(seg_lo, seg_hi, seg_end, pid, ptr, depth, pos, klen):
    """As scatter_keys, but write each start's position (relative to the chunk) and real key
    length instead of its key: for builds that keep the training tokens in memory."""
    w = depth + 1
    fill = ptr[:-1].copy()
    at = 0
    for s in range(seg_lo.shape[0]):
        for i in range(seg_lo[s], seg_hi[s]):
            p = pid[at]
            at += 1
            if p < 0:
                continue
            r = fill[p]
            fill[p] = r + 1
            pos[r] = i
            klen[r] = min(seg_end[s] - i, w)


@njit(nogil=True, cache=True)
def gather_keys_at(tokens, base, pos, klen, keys):
    """keys[r] = tokens[base + pos[r] : ...][:klen[r]] + 1, zero-padded (the rows of
    scatter_positions, read back from the resident tokens in ascending position order)."""
    w = keys.shape[1]
    for r in range(pos.shape[0]):
        i = base + pos[r]
        L = klen[r]
        for c in range(L):
            keys[r, c] = tokens[i + c] + 1
        for c in range(L, w):
            keys[r, c] = 0
