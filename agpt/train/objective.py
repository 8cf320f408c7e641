"""The training objective: per-row weights and the loss terms of a batch (SPEC §1, §8).

A row p with next-token counts n(p, ·) and mass m = Σ_x n(p, x) contributes

    z(p) · CE(n(p, ·)/m, π_θ(· | p))  =  ω(p) · Σ_x n(p, x) · (−log π_θ(x | p)),   ω = z / m

    z(p) = f(m) · (1 + λ · H(p) / ln V),   f: off → 1, log → ln(1 + m), sqrt → √m, linear → m

and a step's loss is Σ_p (that) / Σ_p z(p) over the step's whole unit (partition, or epoch),
which is fixed before any chunking, so chunks never change the normalisation.
`--mass-weight linear --entropy-lambda 0` is the exact corpus objective: Σ n·(−log π) divided
by the number of predicted tokens, i.e. mean stride-1 window NLL. Interior edge positions have
one successor (H = 0), so λ weights only branching endpoints, as in the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agpt.errors import AgptError

MASS_WEIGHTS = ("off", "log", "sqrt", "linear")


@dataclass(frozen=True)
class Weighting:
    mass_weight: str = "linear"
    entropy_lambda: float = 0.0

    def __post_init__(self) -> None:
        if self.mass_weight not in MASS_WEIGHTS:
            raise AgptError(f"unknown --mass-weight {self.mass_weight!r}: use {', '.join(MASS_WEIGHTS)}")
        if not np.isfinite(self.entropy_lambda) or self.entropy_lambda < 0:
            raise AgptError("--entropy-lambda must be a finite number >= 0")


def row_weights(count_ptr: np.ndarray, count_value: np.ndarray, vocab_size: int,
                w: Weighting) -> tuple[np.ndarray, np.ndarray]:
    """(z, ω) per row; rows with no counts get 0."""
    n_rows = len(count_ptr) - 1
    val = count_value.astype(np.float64)
    row = np.repeat(np.arange(n_rows), np.diff(count_ptr))
    mass = np.bincount(row, weights=val, minlength=n_rows)
    f = {"off": (mass > 0).astype(np.float64), "log": np.log1p(mass), "sqrt": np.sqrt(mass),
         "linear": mass}[w.mass_weight]
    z = f
    if w.entropy_lambda and vocab_size > 1:
        safe = np.where(mass > 0, mass, 1.0)
        q = val / safe[row]
        h = -np.bincount(row, weights=q * np.log(np.where(q > 0, q, 1.0)), minlength=n_rows)
        z = f * (1.0 + w.entropy_lambda * h / np.log(vocab_size))
    omega = np.where(mass > 0, z / np.where(mass > 0, mass, 1.0), 0.0)
    return z, omega


@dataclass
class HostTargets:
    rows: np.ndarray | slice  # rows carrying loss (a slice: see targets(dense=True))
    row: np.ndarray       # index into rows, per term
    token: np.ndarray
    coef: np.ndarray
    row_coef: np.ndarray
    z: float              # Σ z over the loss rows (the normaliser's share of this batch)


def targets(count_ptr: np.ndarray, count_token: np.ndarray, count_value: np.ndarray,
            loss: np.ndarray, vocab_size: int, w: Weighting, dense: bool = False) -> HostTargets:
    """Loss terms of the rows flagged `loss`: one compiled pass (agpt.train.expand.loss_terms),
    equal to `targets_reference`. With `dense`, `rows` may come back as a slice over a range
    whose few rows without loss have row_coef 0 and no terms (the same loss and gradient)."""
    from agpt.train.expand import MASS_CODES, loss_terms
    n, c = len(count_ptr) - 1, int(count_ptr[-1])
    rows, row, token = np.empty(n, np.int64), np.empty(c, np.int64), np.empty(c, np.int64)
    coef, row_coef = np.empty(c), np.empty(n)
    lam = float(w.entropy_lambda) if vocab_size > 1 else 0.0
    nr, nt, lo = loss_terms(count_ptr, count_token, count_value, np.asarray(loss, bool),
                            MASS_CODES[w.mass_weight], lam, float(np.log(max(vocab_size, 2))),
                            dense, rows, row, token, coef, row_coef)
    return HostTargets(slice(lo, lo + nr) if lo >= 0 else rows[:nr], row[:nt], token[:nt],
                       coef[:nt], row_coef[:nr], float(row_coef[:nr].sum()))


def targets_reference(count_ptr: np.ndarray, count_token: np.ndarray, count_value: np.ndarray,
            loss: np.ndarray, vocab_size: int, w: Weighting) -> HostTargets:
    """Loss terms of the rows flagged `loss` (NumPy oracle of `targets`)."""
    z, omega = row_weights(count_ptr, count_value, vocab_size, w)
    z = np.where(loss, z, 0.0)
    rows = np.flatnonzero(z > 0)
    clen = np.diff(count_ptr)[rows]
    from agpt.trie.radix import ranges
    src = ranges(count_ptr[rows], clen)
    row = np.repeat(np.arange(len(rows)), clen)
    coef = omega[rows][row] * count_value[src]
    return HostTargets(rows, row, count_token[src].astype(np.int64), coef, z[rows], float(z.sum()))
