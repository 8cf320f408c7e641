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
def loss_terms(count_ptr, count_token, count_value, loss, mode, lam, log_v,
               rows, row, token, coef, row_coef):
    """Loss terms of the rows flagged `loss` with mass > 0 (objective.targets): returns
    (rows used, terms used, Σ z). z = f(mass)·(1 + λ·H/ln V), each term's coef = z/mass·n."""
    nr = 0
    nt = 0
    zsum = 0.0
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
        rows[nr] = p
        row_coef[nr] = z
        for j in range(a, b):
            row[nt] = nr
            token[nt] = count_token[j]
            coef[nt] = om * count_value[j]
            nt += 1
        nr += 1
        zsum += z
    return nr, nt, zsum
