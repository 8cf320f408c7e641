"""Host data (trie units, windows) -> device batches for the model."""

from __future__ import annotations

from typing import Any

import numpy as np

from agpt.model.gpt import Batch, Targets
from agpt.model.layout import WindowLayout
from agpt.train.objective import HostTargets, Weighting, targets
from agpt.train.units import Unit


def _rows(be, rows: np.ndarray | slice) -> Any:
    """The loss rows as a slice when they are one contiguous range: the model then takes
    views instead of gathers."""
    if isinstance(rows, slice):
        return rows
    if len(rows) and int(rows[-1]) - int(rows[0]) == len(rows) - 1:
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return be.asarray(rows)


def to_device(be, tokens: np.ndarray, layout, t: HostTargets) -> Batch:
    dt = be.dtype
    return Batch(be.asarray(np.asarray(tokens, np.int64)), be.prepare(layout),
                 Targets(_rows(be, t.rows), be.asarray(t.row), be.asarray(t.token),
                         be.asarray(t.coef, dt), be.asarray(t.row_coef, dt)))


def unit_batch(be, unit: Unit, vocab_size: int, w: Weighting) -> tuple[Batch, float]:
    """A trie unit (or chunk) as a batch, and its share of the normaliser."""
    t = targets(unit.count_ptr, unit.count_token, unit.count_value, unit.loss, vocab_size, w,
                dense=True)
    return to_device(be, unit.token, be.tree_layout(unit.parent, unit.depth), t), t.z


def window_batch(be, tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                 seq_len: int) -> tuple[Batch, float]:
    """Windows t[s .. s+len) each predicting t[s+1 .. s+len]; rows past len are padding.

    lengths[b] <= seq_len is the number of predictions of window b (shorter at a document or
    stream end); every prediction has weight 1, so the loss is the plain summed NLL."""
    b = len(starts)
    pos = np.arange(seq_len)
    idx = np.minimum(starts[:, None] + pos[None, :], len(tokens) - 1)
    inp = tokens[idx].astype(np.int64).ravel()
    valid = (pos[None, :] < lengths[:, None]).ravel()
    rows = np.flatnonzero(valid)
    nxt = tokens[np.minimum(idx + 1, len(tokens) - 1)].astype(np.int64).ravel()[rows]
    one = np.ones(len(rows))
    t = HostTargets(rows, np.arange(len(rows)), nxt, one, one, float(len(rows)))
    return to_device(be, inp, WindowLayout(b, seq_len), t), t.z


def window_starts(doc_bounds: list[tuple[int, int]], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Every start of stride-1 window training and its number of predictions (SPEC §4 starts:
    a start needs a successor in its document; windows are cut at the document end)."""
    st, ln = [], []
    for a, b in doc_bounds:
        s = np.arange(a, max(a, b - 1))
        st.append(s)
        ln.append(np.minimum(seq_len, b - 1 - s))
    return (np.concatenate(st) if st else np.zeros(0, np.int64),
            np.concatenate(ln) if ln else np.zeros(0, np.int64))


__all__ = ["unit_batch", "window_batch", "window_starts", "Weighting"]
