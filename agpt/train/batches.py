"""Host data (trie units, windows) -> device batches for the model."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from agpt.gpu.tiles import TileLayout, host_tiles
from agpt.model.gpt import Batch, Targets
from agpt.model.layout import WindowLayout
from agpt.train.objective import HostTargets, Weighting, targets
from agpt.train.units import Unit, chunk, chunk_spans

T = TypeVar("T")


def to_device(be, tokens: np.ndarray, layout, t: HostTargets) -> Batch:
    """A batch on the device: its arrays go up together (be.asarrays). Loss rows that are one
    contiguous range stay a slice, so the model takes views instead of gathers."""
    rows = t.rows
    if not isinstance(rows, slice) and len(rows) and int(rows[-1]) - int(rows[0]) == len(rows) - 1:
        rows = slice(int(rows[0]), int(rows[-1]) + 1)
    dt = be.dtype
    host = [np.asarray(tokens, np.int64), np.asarray(t.row), np.asarray(t.token),
            np.asarray(t.coef, dt), np.asarray(t.row_coef, dt)]
    dev = be.asarrays(host if isinstance(rows, slice) else [*host, np.asarray(rows)])
    tok, row, token, coef, row_coef = dev[:5]
    return Batch(tok, be.prepare(layout),
                 Targets(rows if isinstance(rows, slice) else dev[5], row, token, coef, row_coef))


@dataclass
class HostBatch:
    """A batch's host arrays, ready to upload: its rows as a forest (tokens, parent, depth; a
    padded batch also fixes the layout's shapes: `max_depth`, `fixed`) and its loss terms."""

    tokens: np.ndarray
    parent: np.ndarray
    depth: np.ndarray
    targets: HostTargets
    max_depth: int | None = None
    fixed: bool = False
    tiles: TileLayout | None = None   # the GPU attention tiles, if laid out already

    def upload(self, be) -> tuple[Batch, float]:
        """The device batch and its share of z."""
        layout = be.tree_layout(self.parent, self.depth, self.max_depth, self.fixed, self.tiles)
        return to_device(be, self.tokens, layout, self.targets), self.targets.z

    def for_device(self, dtype: Any) -> HostBatch:
        """The same batch as the GPU backend uploads it (int32 parents, `dtype` coefficients,
        its attention tiles laid out): prepared where it is built (a worker process), so the
        upload is only copies."""
        t = self.targets
        parent, depth = self.parent.astype(np.int32), self.depth.astype(np.int32)
        return HostBatch(np.asarray(self.tokens, np.int64), parent, depth,
                         HostTargets(t.rows, t.row, t.token, t.coef.astype(dtype),
                                     t.row_coef.astype(dtype), t.z),
                         self.max_depth, self.fixed,
                         host_tiles(parent, depth, self.max_depth, fixed=self.fixed))


def host_unit_batch(unit: Unit, vocab_size: int, w: Weighting) -> HostBatch:
    """A trie unit (or chunk) as a host batch."""
    t = targets(unit.count_ptr, unit.count_token, unit.count_value, unit.loss, vocab_size, w,
                dense=True)
    return HostBatch(unit.token, unit.parent, unit.depth, t)


def unit_batch(be, unit: Unit, vocab_size: int, w: Weighting) -> tuple[Batch, float]:
    """A trie unit (or chunk) as a batch, and its share of the normaliser."""
    return host_unit_batch(unit, vocab_size, w).upload(be)


#: the smallest capacity of a padded batch (rows or loss terms)
MIN_CAPACITY = 128


def capacity(n: int) -> int:
    """The smallest of 2^k and 3 * 2^(k-1) (k >= 7) that holds n: a padded batch wastes under
    a third of its rows (a sixth on average) and the sizes up to 2^18 rows take 23 classes."""
    c = MIN_CAPACITY
    while c < n:
        c = c * 3 // 2 if c & (c - 1) == 0 else c // 3 * 4
    return c


def host_padded_batch(unit: Unit, vocab_size: int, w: Weighting, max_depth: int) -> HostBatch:
    """host_unit_batch with every array's shape fixed by (capacity(rows + 1),
    capacity(terms), max_depth), so one CUDA graph serves every unit of its class (their
    arrays copied in).

    The padding rows are roots of depth 1 after the unit's rows (preorder holds; no real row
    attends to them) with token 0 and no loss (row coefficient 0); every row is a loss row
    (`rows` is all of them: the context rows get row coefficient 0, as in targets(dense)), and
    the padding terms have coefficient 0 on the last row, which is always padding. Zero
    coefficients give zero gradients, so the loss and gradient are the unit's own."""
    t = targets(unit.count_ptr, unit.count_token, unit.count_value, unit.loss, vocab_size, w,
                dense=True)
    n = unit.n_rows
    c, m = capacity(n + 1), capacity(len(t.row))
    loss_rows = np.arange(n)[t.rows]
    tokens = np.zeros(c, np.int64)
    tokens[:n] = unit.token
    parent = np.full(c, -1, np.int64)
    parent[:n] = unit.parent
    depth = np.ones(c, np.int32)
    depth[:n] = unit.depth
    row = np.full(m, c - 1, np.int64)
    row[:len(t.row)] = loss_rows[t.row]
    token = np.zeros(m, np.int64)
    token[:len(t.token)] = t.token
    coef = np.zeros(m)
    coef[:len(t.coef)] = t.coef
    row_coef = np.zeros(c)
    row_coef[loss_rows] = t.row_coef
    padded = HostTargets(slice(0, c), row, token, coef, row_coef, t.z)
    return HostBatch(tokens, parent, depth, padded, max_depth, fixed=True)


def padded_unit_batch(be, unit: Unit, vocab_size: int, w: Weighting,
                      max_depth: int) -> tuple[Batch, float]:
    """host_padded_batch, uploaded."""
    return host_padded_batch(unit, vocab_size, w, max_depth).upload(be)


class Piece(Protocol):
    """One batch of a unit on the host (a chunk, or the whole unit), uploaded once."""

    def upload(self, put: Callable[[HostBatch], T]) -> T:
        """put(the host batch): its arrays are valid only during the call."""

    def discard(self) -> None:
        """Release it without uploading."""


@dataclass
class LazyPiece:
    """A piece built by the thread that uploads it (a unit's chunks are cut side by side)."""

    build: Callable[[], HostBatch]

    def upload(self, put: Callable[[HostBatch], T]) -> T:
        return put(self.build())

    def discard(self) -> None:
        pass


@dataclass
class HostUnit:
    """A unit's batches on the host: one per chunk, or one padded to its capacity class."""

    name: str
    n_rows: int
    padded: bool
    pieces: list[Piece]


@dataclass(frozen=True)
class HostSpec:
    """How units become host batches: chunks of at most `max_rows` rows; a unit whose
    capacity class is at most `pad_rows` rows (<= max_rows) padded to it (0: none)."""

    vocab_size: int
    weighting: Weighting
    max_rows: int
    max_depth: int
    pad_rows: int = 0


def host_unit(unit: Unit, spec: HostSpec) -> HostUnit:
    """The unit's pieces, built lazily."""
    if capacity(unit.n_rows + 1) <= spec.pad_rows:
        return HostUnit(unit.name, unit.n_rows, True, [LazyPiece(functools.partial(
            host_padded_batch, unit, spec.vocab_size, spec.weighting, spec.max_depth))])

    def piece(span: tuple[int, int]) -> HostBatch:
        return host_unit_batch(chunk(unit, span), spec.vocab_size, spec.weighting)

    return HostUnit(unit.name, unit.n_rows, False,
                    [LazyPiece(functools.partial(piece, sp))
                     for sp in chunk_spans(unit, spec.max_rows)])


def batch_arrays(b: Batch) -> list[Any]:
    """A batch's arrays in a fixed order (what a graph's input buffers are copied over in)."""
    t, lay = b.targets, b.layout
    out = [b.tokens, *(lay.arrays() if hasattr(lay, "arrays") else [])]
    if t is not None:
        out += [t.row, t.token, t.coef, t.row_coef]
        out += [] if isinstance(t.rows, slice) else [t.rows]
    return out


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


__all__ = ["HostBatch", "HostSpec", "HostUnit", "LazyPiece", "Piece", "unit_batch",
           "host_unit_batch", "padded_unit_batch", "host_padded_batch", "host_unit", "capacity",
           "batch_arrays", "window_batch", "window_starts", "Weighting"]
