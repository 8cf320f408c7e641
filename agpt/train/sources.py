"""Where the loader threads of a GPU run get each unit's host batches (agpt.train.batches).

- `ThreadSource`: the loader thread reads the unit and prepares it itself (UnitReader, then
  batches.host_unit; a unit's chunks are cut on the threads that upload them).
- `ProcessSource`: worker processes (agpt.train.workers) read blocks of partitions from the store,
  expand them, compute their loss terms (and their chunks, or their padding), lay out their
  attention tiles (agpt.gpu.tiles) and hand the arrays back in shared memory; the loader
  threads only upload them (two copies per piece).

Why processes: a streamed D=32 epoch of tinyshakespeare took ~4.9 s of loader time on the
H100 machine's CPU (Zarr reads 1.3 s, expansion and loss terms 1.0 s, the tile layout, then on
the GPU, 1.2 s, uploads 0.7 s) against ~0.9 s of GPU work, and in threads all of it shares the
trainer's GIL: more loader threads ended the waits but slowed the thread that launches the
GPU's work just as much. In worker processes the reads and the host kernels run beside it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

from agpt.errors import AgptError
from agpt.gpu.tiles import TileLayout, host_tiles
from agpt.store.format import TOKEN_DTYPES
from agpt.store.trie import TrieStore, open_trie
from agpt.train.batches import HostBatch, HostSpec, HostUnit, T, host_unit
from agpt.train.objective import HostTargets, Weighting, targets
from agpt.train.units import (
    READ_BLOCK_ROWS,
    UnitReader,
    load_unit,
    partition_unit,
    radix_unit,
    read_blocks,
)
from agpt.train.workers import HostWorkers
from agpt.trie.radix import RadixTrie


class ThreadSource:
    """Units read and prepared on the loader thread that asks for them."""

    def __init__(self, store: TrieStore, order: Sequence[int], spec: HostSpec,
                 block_rows: int = READ_BLOCK_ROWS):
        self.reader = UnitReader(store, order, block_rows)
        self.spec = spec

    def host_unit(self, i: int) -> HostUnit:
        return host_unit(self.reader.unit(i), self.spec)

    def close(self) -> None:
        pass


#: units of blocks submitted and not yet taken, at most (beyond the block asked for): their
#: arrays wait in shared memory, ~45 bytes a row
LOOKAHEAD_ROWS = 16 << 20

def load_host_kernels(token_dtypes: Sequence[Any] = TOKEN_DTYPES) -> None:
    """Call every compiled host kernel with each type it gets from a store whose tokens are
    one of `token_dtypes`, on a synthetic two-row partition: a process's first call of a
    kernel loads it (~0.45 s in all on the dev machine, most of it numba setting up, SciPy
    among its imports), which the first unit waited for otherwise. No store I/O: the fork
    server runs this, and must not start Zarr's I/O thread before it forks. Errors are left to
    the units' own calls, which report them."""
    try:
        for dt in token_dtypes:
            tok = np.arange(2, dtype=dt)
            one = np.ones(1, np.int64)
            rt = RadixTrie(-one, np.ones(1, np.int16), one, np.array([0, 2]), tok,
                           np.array([0, 1]), tok[:1].copy(), one, np.array([0, 1]))
            u = radix_unit(rt, None, "warm-up")
            targets(u.count_ptr, u.count_token, u.count_value, u.loss, 2, Weighting(), dense=True)
            host_tiles(u.parent, u.depth)
    except Exception:  # noqa: BLE001, S110 - see above
        pass


def init_worker(url: str | None) -> None:
    """(In a worker, as it starts.) Ignore Ctrl-C; open the store at `url`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if url is None:
        return
    try:
        _STORES[url] = open_trie(url)
    except Exception:  # noqa: BLE001, S110 - the units' tasks report it
        pass


class ProcessSource:
    """The units of one epoch's `order` prepared by `workers`, a block of consecutive
    partitions per task (one Zarr read: units.read_blocks), blocks ahead of the unit asked
    for. Each piece is one shared-memory segment, unlinked once uploaded (or by `close`,
    which releases whatever was never uploaded).

    A loader thread asking for a unit whose block no worker has been given prepares that block
    itself, as a ThreadSource, and (workers ready) submits the blocks after it: so it never
    waits for a worker to start on the very block it needs. That happens until a worker has
    started (when the fork server is not ready yet: workers.start_fork_server), and at the
    hand-over from the threads to the workers, whose lead starts from nothing (units waited
    up to ~0.1 s there). The workers are handed the blocks no thread has taken as soon as one
    of them has started (at once for a source made when they are ready)."""

    def __init__(self, workers: HostWorkers, store: TrieStore, order: Sequence[int],
                 spec: HostSpec, dtype: Any, block_rows: int = READ_BLOCK_ROWS):
        self.workers, self.url, self.spec = workers, store.url, spec
        self.dtype = np.dtype(dtype).str
        self._n_partitions = store.n_partitions
        first = {i: k for k, i in enumerate(order)}
        spine = [[i] for i in order if i >= store.n_partitions]      # read alone
        blocks = read_blocks(store, order, block_rows) + spine
        self._blocks = sorted(blocks, key=lambda b: first[b[0]])
        self._block_of = {i: k for k, b in enumerate(self._blocks) for i in b}
        radix = store.radix_rows()
        self._rows = {i: int(radix[i]) if i < len(radix) else 0 for i in order}
        self._rows_out = 0                  # rows of the units submitted and not yet taken
        self._futures: dict[int, Future] = {}
        self._next = 0                      # the next block to submit
        self._local = ThreadSource(store, order, spec, block_rows)
        self._released: set[str] = set()
        self._lock = threading.Lock()
        self._closed = False
        workers.when_ready(self._hand_over)

    def _hand_over(self) -> None:
        """(Once a worker has started.) Submit the blocks from the first that no loader thread
        has taken: the threads, each busy on its own unit (~0.3 s), had left the workers idle
        until one asked for its next unit."""
        with self._lock:
            if self._closed:
                return
            try:
                self._submit(self._next)
            except BrokenProcessPool:       # reported by the next unit asked for
                pass

    def _submit(self, k: int) -> None:
        """Submit blocks up to block k, then ahead: at most 2 x workers blocks and
        LOOKAHEAD_ROWS rows waiting (big units take one worker ~0.3 s: a lead of a few small
        blocks left the GPU waiting for them)."""
        while self._next < len(self._blocks) and (
                self._next <= k or (self._next <= k + 2 * self.workers.n
                                    and self._rows_out < LOOKAHEAD_ROWS)):
            b = self._blocks[self._next]
            self._rows_out += sum(self._rows[i] for i in b)
            span = (b[0], b[-1] + 1) if b[0] < self._n_partitions else None
            self._futures[self._next] = self.workers.pool.submit(
                prepare_block, self.url, b, span, self.spec, self.dtype)
            self._next += 1

    def host_unit(self, i: int) -> HostUnit:
        k = self._block_of[i]
        try:
            with self._lock:
                if self._closed:
                    raise AgptError("the unit source was closed")
                local = k not in self._futures
                if not local:
                    self._submit(k)
                    self._rows_out -= self._rows[i]
                    fut = self._futures[k]
                elif k >= self._next:             # a block no one has: this thread's
                    self._next = k + 1
                    if self.workers.ready:
                        self._submit(k)           # the blocks after it, to the workers
            if local:
                return self._local.host_unit(i)
            name, n_rows, padded, pieces = fut.result()[i]
        except BrokenProcessPool as e:
            raise AgptError("a host worker process died while preparing partitions (out of "
                            "host memory? a script that trains must guard its code with `if "
                            "__name__ == '__main__':`, as multiprocessing requires); "
                            "--host-workers -1 prepares them on the loader threads") from e
        return HostUnit(name, n_rows, padded,
                        [ShmPiece(seg, fields, meta, self._unlink) for seg, fields, meta in pieces])

    def _unlink(self, seg: str) -> None:
        with self._lock:
            if seg in self._released:
                return
            self._released.add(seg)
        try:
            SharedMemory(seg).unlink()
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Cancel the blocks not started; release every segment never uploaded."""
        with self._lock:
            self._closed = True
            futures = list(self._futures.values())
        for f in futures:
            if f.cancel():
                continue
            try:
                res = f.result()
            except Exception:  # noqa: BLE001, S112 - the loaders report the error
                continue
            for _, _, _, pieces in res.values():
                for seg, _, _ in pieces:
                    self._unlink(seg)


@dataclass
class ShmPiece:
    """A piece whose arrays a worker left in the shared-memory segment `seg`."""

    seg: str
    fields: list[tuple[str, str, tuple[int, ...], int]]    # name, dtype, shape, offset
    meta: dict[str, Any]
    release: Callable[[str], None]

    def upload(self, put: Callable[[HostBatch], T]) -> T:
        shm = SharedMemory(self.seg)
        try:
            return put(_unpack(shm, self.fields, self.meta))
        finally:
            try:
                shm.close()
            except BufferError:       # a traceback holds views of it: they keep it mapped
                pass
            self.release(self.seg)

    def discard(self) -> None:
        self.release(self.seg)


def _unpack(shm: SharedMemory, fields: list, meta: dict[str, Any]) -> HostBatch:
    a = {name: np.ndarray(shape, np.dtype(dt), buffer=shm.buf, offset=off)
         for name, dt, shape, off in fields}
    rows = slice(*meta["rows"]) if meta["rows"] is not None else a["rows"]
    t = HostTargets(rows, a["row"], a["token"], a["coef"], a["row_coef"], meta["z"])
    tiles = (TileLayout(meta["tile"], a["anc"], a["bidx"], a["brow"], meta["tile_depth"])
             if "anc" in a else None)
    return HostBatch(a["tokens"], a["parent"], a["depth"], t, meta["max_depth"], meta["fixed"],
                     tiles)


def _pack(hb: HostBatch) -> tuple[str, list, dict[str, Any]]:
    """hb's arrays in a new shared-memory segment (the parent unlinks it): (name, fields,
    meta)."""
    t = hb.targets
    arrays = {"tokens": hb.tokens, "parent": hb.parent, "depth": hb.depth, "row": t.row,
              "token": t.token, "coef": t.coef, "row_coef": t.row_coef}
    if not isinstance(t.rows, slice):
        arrays["rows"] = t.rows
    if hb.tiles is not None:
        arrays.update(anc=hb.tiles.anc, bidx=hb.tiles.bidx, brow=hb.tiles.brow)
    fields, off = [], 0
    for name, x in arrays.items():
        x = np.ascontiguousarray(x)
        fields.append((name, x.dtype.str, x.shape, off))
        off += -(-x.nbytes // 64) * 64
    shm = SharedMemory(create=True, size=max(off, 64))
    try:
        for (_, _, shape, o), x in zip(fields, arrays.values(), strict=True):
            np.ndarray(shape, x.dtype, buffer=shm.buf, offset=o)[...] = x
    except BaseException:
        shm.close()
        shm.unlink()
        raise
    shm.close()
    meta = {"rows": (t.rows.start, t.rows.stop) if isinstance(t.rows, slice) else None,
            "z": t.z, "max_depth": hb.max_depth, "fixed": hb.fixed}
    if hb.tiles is not None:
        meta.update(tile=hb.tiles.tile, tile_depth=hb.tiles.max_depth)
    return shm.name, fields, meta


_STORES: dict[str, TrieStore] = {}


def prepare_block(url: str, units: list[int], span: tuple[int, int] | None, spec: HostSpec,
                  dtype: str) -> dict[int, tuple[str, int, bool, list]]:
    """(In a worker.) The units of one block: each one's name, rows, whether it is padded and
    its pieces as shared-memory segments. `span` is the block's partitions (read together);
    None: one unit read alone (the spine)."""
    store = _STORES.get(url)
    if store is None:
        store = _STORES[url] = open_trie(url)
    rt = store.radix_partitions(*span) if span is not None else None
    out: dict[int, tuple[str, int, bool, list]] = {}
    made: list[str] = []                # segments so far: unlinked if the block fails
    try:
        for i in units:
            unit = (partition_unit(store, i, rt.partition(i - span[0])) if rt is not None
                    else load_unit(store, i))
            hu = host_unit(unit, spec)
            pieces = []
            for p in hu.pieces:
                pieces.append(p.upload(lambda hb: _pack(hb.for_device(dtype))))
                made.append(pieces[-1][0])
            out[i] = (hu.name, hu.n_rows, hu.padded, pieces)
    except BaseException:
        for seg in made:
            SharedMemory(seg).unlink()
        raise
    return out
