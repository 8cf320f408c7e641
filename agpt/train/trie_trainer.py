"""`agpt train`: exact aggregated-gradient training on a trie store (SPEC §8).

An epoch visits the units (every partition with its spine prefix as context, then the spine
itself when it has nodes below the root), reading the next ones on loader threads while the
current one is computed. On the GPU the loaders also cut and upload each unit (pinned memory,
side stream), and units stay cached on the device while they fit the budget, so later epochs
read nothing; from then on a small cached unit's forward and backward (~300 kernel launches
from Python) are replayed as one CUDA graph. Small units that are not cached (a trie larger
than the cache, or `--no-gpu-cache`) are staged padded to a capacity class and replayed on
their class's graph (agpt.train.graphs). The host never waits for the device between
units (losses stay on the device, each update is checked once the device has done it:
Session.settle), so it runs ahead through long units.
A unit larger than the memory budget is cut into chunks
(units.chunks) whose gradients sum to the unit's, so the budget never changes the math.
One update per unit (`step="partition"`, the seed's recipe) or per epoch (`step="epoch"`).
"""

from __future__ import annotations

import collections
import functools
import gc
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from agpt.errors import AgptError
from agpt.model.config import ModelConfig
from agpt.model.gpt import Batch, loss_and_grad
from agpt.store.format import token_dtype
from agpt.store.trie import TrieStore
from agpt.train.batches import HostBatch, HostSpec, Piece, batch_arrays, to_device
from agpt.train.graphs import UnitGraphs
from agpt.train.objective import HostTargets, Weighting
from agpt.train.session import Session
from agpt.train.sources import ProcessSource, ThreadSource, load_host_kernels
from agpt.train.units import unit_count
from agpt.train.workers import HostWorkers, start_early, worker_count


@dataclass(frozen=True)
class TrieArgs:
    epochs: int = 1
    step: str = "partition"          # partition | epoch
    gradient: str = "exact"          # exact | truncated
    mass_weight: str = "linear"
    entropy_lambda: float = 0.0
    memory_budget: int = 2 << 30     # CPU: bytes of activations per chunk
    gpu_memory_budget: int = 0       # GPU: bytes the run may hold on the device (0: 90% of free)
    loaders: int = 0                 # threads reading (and staging) the next units (0: auto)
    host_workers: int = 0            # GPU: processes preparing units (0: auto, -1: none)
    cuda_graphs: bool = True         # GPU: replay small units as CUDA graphs
    gpu_cache: bool = True           # GPU: keep staged units on the device for later epochs
    shuffle: bool = False            # visit partitions in a seeded random order each epoch
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise AgptError("--epochs must be >= 1")
        if self.step not in ("partition", "epoch"):
            raise AgptError(f"unknown --step {self.step!r}: use partition or epoch")
        if self.loaders < 0:
            raise AgptError("--loaders must be >= 0 (0: 4 on the GPU, 2 on the CPU)")
        if self.host_workers < -1:
            raise AgptError("--host-workers must be >= -1 (0: auto, -1: none)")
        if self.gradient not in ("exact", "truncated"):
            raise AgptError(f"unknown --gradient {self.gradient!r}: use exact or truncated")
        Weighting(self.mass_weight, self.entropy_lambda)

    @property
    def weighting(self) -> Weighting:
        return Weighting(self.mass_weight, self.entropy_lambda)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rows_for_budget(be, cfg: ModelConfig, depth: int, budget: int,
                    flag: str = "--memory-budget") -> int:
    """Rows per chunk whose activations fit `budget` bytes on backend `be`."""
    per_row = be.bytes_per_row(cfg, depth)
    rows = budget // per_row
    if rows < depth + 1:
        raise AgptError(f"{flag} {budget:,} bytes cannot hold one context of depth {depth} "
                        f"(needs {(depth + 1) * per_row / 2**20:.1f} MiB of activations); raise it")
    return int(rows)


@dataclass
class Staged:
    """A unit ready to compute: its chunks as device batches (uploaded on loader threads when
    the backend stages in the background; on the CPU built from `pieces` as they are used).
    A unit of several chunks may still be uploading them (`pending`): the trainer starts on
    the first. A `padded` unit is one batch of a capacity class (batches.host_padded_batch),
    replayed on its class's CUDA graph."""

    name: str
    n_rows: int
    batches: list[tuple[Batch, float]] | None = None
    nbytes: int = 0
    pending: list[Future] | None = None
    pieces: list[Piece] | None = None
    padded: bool = False

    def each(self, be) -> Iterator[tuple[Batch, float]]:
        if self.pending is not None:
            done = []
            for f in self.pending:
                done.append(f.result())
                yield done[-1]
            self.batches, self.pending = done, None
            self.nbytes = sum(_nbytes(b) for b, _ in done)
            return
        if self.batches is not None:
            yield from self.batches
            return
        assert self.pieces is not None
        for p in self.pieces:
            yield p.upload(lambda hb: hb.upload(be))


def warm_up_host(store: TrieStore, args: TrieArgs, device: str) -> None:
    """Started before the model and the device are set up (CuPy's import, the CUDA context),
    so that the host side is ready when they are:
    - the compiled host kernels load on a background thread (sources.load_host_kernels): the
      loader threads call them too, and their first call loaded them (~1 s on the H100
      machine), which the first unit waited for;
    - a GPU run that may use worker processes starts their fork server (workers.start_early;
      `agpt train` has started it already, before its imports)."""
    # the store's token dtype only: this thread holds the trainer's GIL for much of its
    # ~1.1 s (H100 machine), which ends inside epoch 1
    threading.Thread(target=load_host_kernels, args=([token_dtype(store.vocab_size)],),
                     name="agpt-warm", daemon=True).start()
    start_early(device, args.host_workers, store.url)


def warm_up_device(s: Session, depth: int, vocab_size: int, truncated: bool) -> float:
    """One forward/backward and one update's kernels on a tiny synthetic tree, into scratch
    buffers (the run's state is untouched); returns its seconds.

    A process's first launch of each kernel loads it (CuPy's kernel cache, cuBLAS's lazy
    module loading): ~2 s at D=32 on the H100 machine, which the first epoch's units paid one
    after another while the next units sat staged. Run with the loaders already reading, it
    overlaps their start (numba's load among it) instead. Built without the compiled host
    kernels, which may still be loading."""
    be = s.be
    n = max(2, depth)
    parent = np.arange(-1, 2 * n - 1, dtype=np.int64)     # a chain of n rows, then a branch
    parent[n] = -1
    dep = np.concatenate([np.arange(1, n + 1), np.arange(1, n + 1)]).astype(np.int32)
    tok = np.arange(2 * n, dtype=np.int64) % vocab_size
    one = np.ones(2 * n)
    t = HostTargets(slice(0, 2 * n), np.arange(2 * n), (tok + 1) % vocab_size, one, one,
                    float(2 * n))
    t0 = time.perf_counter()
    with be.staged():              # the loaders' upload path (its kernels, pinned arena)
        batch = to_device(be, tok, be.tree_layout(parent, dep), t)
    grad = be.xp.zeros_like(s.grad)
    s.rehearse_update(grad, loss_and_grad(s.cfg, be, s.params, batch, grad, truncated))
    return time.perf_counter() - t0


def stage(be, source: ThreadSource | ProcessSource, i: int,
          chunk_pool: ThreadPoolExecutor | None = None) -> Staged:
    """Unit i from `source`; on a staging backend, its pieces uploaded (pinned, side stream).
    With `chunk_pool`, a unit of several chunks returns at once, its chunks being cut and
    uploaded there side by side (the 4M-row unit of tinyshakespeare D=32 took ~0.6 s to stage
    on one thread, against ~0.1 s of GPU work). A padded unit (batches.host_unit) is replayed
    on its class's CUDA graph."""
    hu = source.host_unit(i)
    if not getattr(be, "stage_in_background", False):
        return Staged(hu.name, hu.n_rows, pieces=hu.pieces)

    def put(hb: HostBatch) -> tuple[Batch, float]:
        try:
            with be.staged():
                return hb.upload(be)
        except be.xp.cuda.memory.OutOfMemoryError:
            # the pool caches freed blocks per stream and they count against the cap: release
            # the ones no stream uses, then try once more
            be.xp.get_default_memory_pool().free_all_blocks()
            with be.staged():
                return hb.upload(be)

    def upload(piece: Piece) -> tuple[Batch, float]:
        return piece.upload(put)

    if len(hu.pieces) > 1 and chunk_pool is not None:
        return Staged(hu.name, hu.n_rows,
                      pending=[chunk_pool.submit(upload, p) for p in hu.pieces])
    batches = [upload(p) for p in hu.pieces]
    return Staged(hu.name, hu.n_rows, batches, sum(_nbytes(b) for b, _ in batches),
                  padded=hu.padded)


def _nbytes(b: Batch) -> int:
    return sum(int(a.nbytes) for a in batch_arrays(b))


class Prefetch:
    """make(i) for i in `order` on `workers` threads, ahead of the consumer: at least `ahead`
    units, and more while the units in flight hold fewer than `rows_ahead` rows (rows(i) says
    how many a unit has). Big units come in clusters (tinyshakespeare's 4M-row space partition
    follows the 0.9M-row newline one): a lead counted in rows absorbs them where a lead of a
    few units does not. Work starts at construction, so it overlaps whatever the caller does
    before iterating (the first epoch's device warm-up). The pool's queue is first in, first
    out, so a deeper lead never delays the unit needed next."""

    def __init__(self, make: Callable[[int], Staged], order: list[int], workers: int = 2,
                 ahead: int = 3, rows: Callable[[int], int] | None = None, rows_ahead: int = 0,
                 on_close: Callable[[], None] | None = None):
        self._on_close = on_close         # called once the threads have stopped
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="agpt-load")
        self._pending: collections.deque = collections.deque()
        self._order = iter(order)
        self._make, self._ahead = make, ahead
        self._rows, self.rows_ahead, self.rows_in_flight = rows, rows_ahead, 0
        self.exhausted = False          # every unit has been submitted
        self._fill()

    def _fill(self) -> None:
        while len(self._pending) < self._ahead or (self._rows is not None
                                                   and self.rows_in_flight < self.rows_ahead):
            i = next(self._order, None)
            if i is None:
                self.exhausted = True
                return
            r = self._rows(i) if self._rows is not None else 0
            self.rows_in_flight += r
            self._pending.append((i, r, self._pool.submit(self._make, i)))

    def __len__(self) -> int:
        """Units submitted and not yet taken."""
        return len(self._pending)

    def __iter__(self) -> Iterator[tuple[int, Staged]]:
        try:
            while self._pending:
                i, r, fut = self._pending.popleft()
                item = fut.result()
                self.rows_in_flight -= r
                self._fill()
                yield i, item
        finally:
            self.close()

    def close(self) -> None:
        for _, _, fut in self._pending:
            fut.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._on_close is not None:
            self._on_close()
            self._on_close = None


#: device bytes of a staged unit per row, an upper bound: tokens, parent, depth, attention tiles,
#: one or two loss terms (row, token, coefficient) and a row coefficient
STAGED_BYTES_PER_ROW = 128
#: units up to this many rows are replayed as CUDA graphs (larger ones keep the GPU busy for
#: longer than Python takes to launch them: ~3 ms of launches against >= 15 ms of work)
GRAPH_MAX_ROWS = 1 << 18
#: below this many rows per graph, the graphs' share of the budget is too small to bother
GRAPH_MIN_ROWS = 1 << 10


@dataclass
class GpuPlan:
    """How a GPU run splits its memory budget: activations of one chunk (1/2), staged units
    in flight (1/4), a device cache of staged units reused from the second epoch on (1/8),
    and the temporaries of the CUDA graphs that replay small units (1/8)."""

    budget: int
    activations: int
    in_flight: int
    cache: int
    graphs: int


def gpu_plan(be, budget: int) -> GpuPlan | None:
    """None on the CPU. On the GPU the run may take `budget` more bytes than the process holds
    now (0: 90% of the free device memory); the memory pool is capped there, so exceeding the
    plan is an error, never a slow fallback."""
    if not getattr(be, "stage_in_background", False):
        return None
    pool = be.xp.get_default_memory_pool()
    pool.free_all_blocks()
    free, _total = be.xp.cuda.runtime.memGetInfo()
    if budget <= 0:
        budget = int(0.9 * free)
    # the pool counts whole cached chunks, and a chunk stays while any piece of it is in use
    pool.set_limit(size=pool.total_bytes() + budget)
    return GpuPlan(budget, budget // 2, budget // 4, budget // 8, budget // 8)


def epoch_order(args: TrieArgs, n_units: int, epoch: int) -> list[int]:
    if not args.shuffle:
        return list(range(n_units))
    return [int(i) for i in np.random.default_rng([args.seed, epoch]).permutation(n_units)]


def start_workers(store: TrieStore, args: TrieArgs, plan: GpuPlan | None) -> HostWorkers | None:
    """Worker processes to prepare the units of a GPU run (sources), cached or not: on the
    loader threads the preparation shares the trainer's GIL, which slows its launches (the
    cached first epoch of tinyshakespeare took 1.51/1.81 s at D=16 and 2.23/2.49 s at D=32
    on threads, 1.10/1.04 and 2.24/1.82 s with workers; `agpt train`, H100 machine). None on
    the CPU, or where workers.worker_count says none."""
    if plan is None:
        return None
    n = worker_count(args.host_workers, store.url)
    return HostWorkers(n, store.url) if n else None


def train_epochs(s: Session, store: TrieStore, args: TrieArgs,
                 until_epoch: int | None = None) -> None:
    """Run epochs from the session's position up to args.epochs (or until_epoch)."""
    be = s.be
    plan = gpu_plan(be, args.gpu_memory_budget)
    # the chunks of a unit larger than a chunk are cut and uploaded side by side here
    chunk_pool = None if plan is None else ThreadPoolExecutor(
        max_workers=args.loaders or 4, thread_name_prefix="agpt-chunk")
    workers = None
    try:
        workers = start_workers(store, args, plan)
        _run_epochs(s, store, args, until_epoch, plan, chunk_pool, workers)
    finally:
        if chunk_pool is not None:
            chunk_pool.shutdown(wait=True, cancel_futures=True)
        if workers is not None:
            workers.close()
        if plan is not None:
            be.xp.get_default_memory_pool().set_limit(size=0)     # the cap is this run's


def _run_epochs(s: Session, store: TrieStore, args: TrieArgs, until_epoch: int | None,
                plan: GpuPlan | None, chunk_pool: ThreadPoolExecutor | None,
                workers: HostWorkers | None) -> None:
    cfg, be = s.cfg, s.be
    n_units = unit_count(store)
    if plan is None:
        per_chunk = rows_for_budget(be, cfg, store.max_depth, args.memory_budget)
    else:
        per_chunk = rows_for_budget(be, cfg, store.max_depth, plan.activations,
                                    "--gpu-memory-budget (half of it for activations):")
    max_rows = min(per_chunk, max(be.chunk_rows, 2 * store.max_depth))
    w = args.weighting
    truncated = args.gradient == "truncated"
    # four loaders keep an H100 fed at D=32 (two left it waiting ~1.5 s in the first epoch);
    # on the CPU the loaders share the cores with the computation
    loaders = args.loaders or (4 if plan is not None else 2)
    radix_rows = store.radix_rows()
    # on the GPU the plan's in-flight share is half for units staged ahead, half for units
    # computed but not yet done on the device (neither counts cached units); on the CPU the
    # loaders stay a few units ahead
    rows_ahead = 0 if plan is None else plan.in_flight // 2 // STAGED_BYTES_PER_ROW
    warmed = plan is None
    cache: dict[int, Staged] = {}           # device-resident units (GPU, while they fit)
    cached_bytes = 0
    # units are cached in the first whole epoch this process runs (a resumed partial epoch
    # does not count); after it, the others are streamed every epoch (and, small, staged
    # padded for their classes' graphs)
    cache_open = args.gpu_cache

    graph_rows = 0
    if plan is not None and args.cuda_graphs:
        graph_rows = min(GRAPH_MAX_ROWS, max_rows,
                         plan.graphs // be.bytes_per_row(cfg, store.max_depth))
        if graph_rows < GRAPH_MIN_ROWS:
            graph_rows = 0                # a budget this small keeps every launch eager
    graphs = UnitGraphs(be, lambda batch: loss_and_grad(cfg, be, s.params, batch, s.grad,
                                                        truncated))

    def make(source: ThreadSource | ProcessSource, i: int) -> Staged:
        return cache.get(i) or stage(be, source, i, chunk_pool)

    def compute(i: int, unit: Staged) -> tuple[Any, float]:
        """The unit's summed loss (a device scalar on the GPU) and weight; gradient added."""
        if unit.padded:
            batch, zc = unit.batches[0]
            return graphs.padded(batch), zc
        if (i in cache and unit.batches is not None and len(unit.batches) == 1
                and unit.n_rows <= graph_rows):
            batch, zc = unit.batches[0]
            return graphs.own(i, batch), zc
        loss_sum: Any = 0.0
        z = 0.0
        for batch, zc in unit.each(be):
            loss_sum = loss_sum + loss_and_grad(cfg, be, s.params, batch, s.grad, truncated)
            z += zc
        return loss_sum, z

    def open_epoch(e: int, start: int, lead: int) -> Prefetch:
        todo = epoch_order(args, n_units, e)[start:]
        read = [i for i in todo if i not in cache]
        spec = HostSpec(store.vocab_size, w, max_rows, store.max_depth,
                        pad_rows=0 if cache_open else graph_rows)
        source = (ProcessSource(workers, store, read, spec, be.dtype) if workers is not None
                  else ThreadSource(store, read, spec))
        return Prefetch(functools.partial(make, source), todo, workers=loaders,
                        ahead=2 * loaders, rows_ahead=lead,
                        rows=lambda i: int(radix_rows[i]) if i < len(radix_rows) else 0,
                        on_close=source.close)

    last = min(args.epochs, until_epoch or args.epochs)
    first_epoch = s.pos.epoch
    # the next epoch's loaders start once this one's units are all submitted, so they stage
    # its first few units (2 x loaders: its lead in rows is released when it begins) while
    # this epoch's last ones compute and its checkpoint is written. A deeper early lead only
    # moved staging into the checkpoint write, which shares Zarr's one event loop with the
    # reads: streamed D=32 epochs looked 40% shorter while the run took 40-65% longer.
    nxt: Prefetch | None = None
    froze = False
    try:
        while s.pos.epoch < last:
            e = s.pos.epoch
            if args.step == "epoch":
                s.pos.unit = 0            # a partial epoch's accumulation is never saved
                s.grad[...] = 0
            ep_loss: Any = 0.0
            ep_z = 0.0
            ep_rows = 0
            t_ep = time.perf_counter()
            io_wait = 0.0
            z_acc = 0.0
            loss_acc: Any = 0.0
            whole = s.pos.unit == 0
            units = nxt if nxt is not None else open_epoch(e, s.pos.unit, rows_ahead)
            nxt = None
            units.rows_ahead = rows_ahead
            warm_s = 0.0
            if not warmed:                  # the loaders are reading meanwhile
                try:
                    warm_s = warm_up_device(s, store.max_depth, store.vocab_size, truncated)
                except BaseException:
                    units.close()
                    raise
                warmed = True
            if not froze:
                # what exists now (CuPy, Numba, Zarr, the model: ~160k objects on the GPU)
                # lives as long as the run: frozen, the cyclic collector's full passes skip
                # it. Unfrozen, one walked it between epochs 1 and 2 for 59-79 ms with the GIL
                # held (H100 machine: in the checkpoint write; a little later, it would hold
                # up epoch 2's first units)
                gc.freeze()
                froze = True
            t_wait = time.perf_counter()
            in_flight: collections.deque = collections.deque()   # (done event, unit) on the GPU
            in_flight_bytes = 0
            first_wait = None
            for k, (i, unit) in enumerate(units, s.pos.unit):
                wait = time.perf_counter() - t_wait
                io_wait += wait
                first_wait = wait if first_wait is None else first_wait
                if nxt is None and units.exhausted and len(units) <= loaders and e + 1 < last:
                    nxt = open_epoch(e + 1, 0, 0)
                # a unit the next epoch's loaders staged before this epoch cached it: the
                # cached copy is the one in use (the other, never used, is dropped)
                unit = cache.get(i, unit)
                loss_sum, z = compute(i, unit)
                ep_loss = ep_loss + loss_sum          # device scalars: no sync per unit
                ep_z += z
                ep_rows += unit.n_rows
                where = f"epoch {e + 1} unit {k + 1}/{n_units} ({unit.name})"
                if args.step == "partition":
                    if z == 0:
                        s.grad[...] = 0
                    else:
                        s.update(z, loss_sum, where, unit=i, rows=unit.n_rows,
                                 io_wait_s=round(wait, 4))
                else:
                    z_acc += z
                    loss_acc = loss_acc + loss_sum
                if plan is not None and i not in cache:
                    if cache_open and not unit.padded and cached_bytes + unit.nbytes <= plan.cache:
                        cache[i] = unit
                        cached_bytes += unit.nbytes
                    else:
                        # the unit's arrays came from a loader's stream: keep them alive until
                        # this stream is done with them, so the pool cannot hand them to the next
                        # upload (cached units stay alive anyway). The host waits only when those
                        # units exceed their share of the plan: it runs ahead through big units
                        # and launches the small ones while the device is still busy
                        in_flight.append((be.record(), unit))
                        in_flight_bytes += unit.nbytes
                        while in_flight and (in_flight_bytes > plan.in_flight // 2
                                             or in_flight[0][0].done):
                            done, old = in_flight.popleft()
                            done.synchronize()
                            in_flight_bytes -= old.nbytes
                if args.step == "partition":
                    s.pos.unit = k + 1    # resumable here; an epoch-step run restarts its epoch
                rate = ep_rows / max(1e-9, time.perf_counter() - t_ep)
                s.show(f"epoch {e + 1}/{args.epochs} unit {k + 1}/{n_units} "
                       f"rows/s {rate:,.0f} lr {s.lr():.3g}")
                t_wait = time.perf_counter()
            if args.step == "epoch" and z_acc > 0:
                s.update(z_acc, loss_acc, f"epoch {e + 1}", rows=ep_rows)
            elif args.step == "epoch":
                s.check_finite(loss_acc, f"epoch {e + 1}")
            s.settle()
            be.synchronize()
            cache_open = cache_open and not whole
            ep_loss = float(ep_loss)
            secs = time.perf_counter() - t_ep
            s.pos.epoch, s.pos.unit = e + 1, 0
            gpu = {} if plan is None else {"gpu_peak_mb": round(be.peak_memory() / 2**20, 1),
                                           "gpu_cached_units": len(cache), "chunk_rows": max_rows,
                                           "cuda_graphs": graphs.n_own,
                                           "cuda_graph_classes": graphs.n_classes}
            if workers is not None and e == first_epoch:
                # when the first worker had started, in seconds from this epoch's start
                # (negative: before it): epoch 1's waits come before it
                at = workers.ready_at
                gpu["workers_ready_s"] = None if at is None else round(at - t_ep, 3)
            s.log("epoch", loss=ep_loss / max(ep_z, 1e-12), rows=ep_rows, seconds=round(secs, 3),
                  rows_per_s=round(ep_rows / max(secs, 1e-9), 1), io_wait_s=round(io_wait, 3),
                  first_unit_wait_s=round(first_wait or 0.0, 3), warm_up_s=round(warm_s, 3),
                  lr=s.lr(), **gpu)
            peak = f", peak GPU memory {gpu['gpu_peak_mb']:,.0f} MB" if gpu else ""
            s.show(f"epoch {e + 1}/{args.epochs} loss {ep_loss / max(ep_z, 1e-12):.4f} "
                   f"{ep_rows:,} rows in {secs:.1f} s ({ep_rows / max(secs, 1e-9):,.0f} rows/s, "
                   f"I/O wait {io_wait:.2f} s{peak})", final=True)
            s.save()
    finally:
        if nxt is not None:
            nxt.close()
        if froze:                 # the default again (a caller's own gc.freeze is undone
            gc.unfreeze()         # too: only the collector's speed depends on it)
