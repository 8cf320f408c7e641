"""Compiled (numba) kernels that turn a partition into the trainer's rows and loss terms.

An epoch expands every radix edge position into a row (27 M rows at tinyshakespeare D=32) and
every row's next-token counts into weighted loss terms. The NumPy formulations
(`units.radix_unit_reference`, `objective.targets_reference`) take ~25 array passes for that
and hold the GIL between them, so the loader threads could not keep a GPU busy in the first
epoch; these do one pass each, release the GIL, and write straight into the final arrays.
Their output equals the references' (tests/test_expand.py).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

#: Weighting.mass_weight -> the kernel's code
MASS_CODES = {"off": 0, "log": 1, "sqrt": 2, "linear": 3}


@njit(nogil=True, cache=True)
def expand_radix(parent, head, mass, edge_ptr, edge_tokens, count_ptr, count_token,
                 count_value, c, root_parent, token, row_parent, depth, ptr, ctok, cval):
    """Rows c.. of a unit from a radix partition, in preorder: each node's edge positions in
    order, the endpoint last. An interior position's one count is (next edge token, the node's
    mass); the endpoint carries the node's counts. ptr[c] (the counts of the rows before) must
    be set; root nodes hang under row `root_parent`."""
    r = c
    k = ptr[c]
    last = np.empty(parent.shape[0], np.int64)     # endpoint row of each node
    for x in range(parent.shape[0]):
        e0, e1 = edge_ptr[x], edge_ptr[x + 1]
        up = parent[x]
        for e in range(e0, e1):
            token[r] = edge_tokens[e]
            depth[r] = head[x] + (e - e0)
            if e > e0:
                row_parent[r] = r - 1
            elif up >= 0:
                row_parent[r] = last[up]
            else:
                row_parent[r] = root_parent
            if e < e1 - 1:
                ctok[k] = edge_tokens[e + 1]
                cval[k] = mass[x]
                k += 1
            else:
                for j in range(count_ptr[x], count_ptr[x + 1]):
                    ctok[k] = count_token[j]
                    cval[k] = count_value[j]
                    k += 1
            r += 1
            ptr[r] = k
        last[x] = r - 1


@njit(nogil=True, cache=True)
def _dense_range(count_ptr, count_value, loss):
    """(lo, hi, n) of the rows that carry loss (flagged, mass > 0): first, last + 1, count."""
    lo, hi, n = -1, -1, 0
    for p in range(count_ptr.shape[0] - 1):
        if not loss[p]:
            continue
        m = 0
        for j in range(count_ptr[p], count_ptr[p + 1]):
            m += count_value[j]
        if m > 0:
            lo = p if lo < 0 else lo
            hi = p + 1
            n += 1
    return lo, hi, n


@njit(nogil=True, cache=True)
def loss_terms(count_ptr, count_token, count_value, loss, mode, lam, log_v, dense,
               rows, row, token, coef, row_coef):
    """Loss terms of the rows flagged `loss` with mass > 0 (objective.targets): returns
    (rows used, terms used, first row of a dense range or -1). z = f(mass)·(1 + λ·H/ln V),
    each term's coef = z/mass·n.

    With `dense`, when the loss rows are one range with few gaps (a trie unit: all rows after
    its context but the rare ones with no successor), the rows are that whole range: the gaps
    get row_coef 0 and no terms, which adds exactly 0 to the loss and its gradient, and the
    model reads the range as a view instead of gathering rows."""
    lo = -1
    if dense:
        a, b, nv = _dense_range(count_ptr, count_value, loss)
        if nv > 0 and b - a <= nv + max(16, nv // 100):
            lo = a
            for i in range(b - a):
                row_coef[i] = 0.0
    nr = 0
    nt = 0
    for p in range(count_ptr.shape[0] - 1):
        if not loss[p]:
            continue
        a, b = count_ptr[p], count_ptr[p + 1]
        m = 0.0
        for j in range(a, b):
            m += float(count_value[j])
        if not m > 0:
            continue
        if mode == 0:
            f = 1.0
        elif mode == 1:
            f = math.log1p(m)
        elif mode == 2:
            f = math.sqrt(m)
        else:
            f = m
        z = f
        if lam != 0.0 and b - a > 1:      # one successor: H = 0 exactly
            h = 0.0
            for j in range(a, b):
                q = float(count_value[j]) / m
                h += q * math.log(q if q > 0 else 1.0)
            z = f * (1.0 + lam * -h / log_v)
        if not z > 0:
            continue
        om = z / m
        k = p - lo if lo >= 0 else nr
        rows[k] = p
        row_coef[k] = z
        for j in range(a, b):
            row[nt] = k
            token[nt] = count_token[j]
            coef[nt] = om * count_value[j]
            nt += 1
        nr = k + 1
    return nr, nt, lo
