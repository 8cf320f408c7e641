"""The trie build pipeline (SPEC §6), as Dask graphs.

    plan     prefix counts over token chunks -> partitions + spine            (map/reduce)
    bucket   each token chunk -> its start positions' keys, grouped by partition,
             spilled to disk (only when the corpus does not fit the memory budget)
    build    each task (a run of consecutive partitions under the budget) -> sorted keys
             -> radix trie (-> leveled trie), staged to disk when spilling    (map)
    write    one writer appends the pieces in order, shard by shard; status -> complete

Memory is bounded by the budget, not the corpus: a task holds at most `task_keys` keys, at
most `workers` tasks run at once, and a bucket holds one token chunk. Staged pieces make a
rerun finish only the missing tasks; the store opens only once the writer has finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np

from agpt.errors import AgptError
from agpt.store.corpus import CorpusStore, open_corpus
from agpt.store.trie import TrieWriter
from agpt.trie.keys import gather_keys, key_dtype, sort_keys
from agpt.trie.plan import _LUT_MAX, Plan, make_plan, partition_ranges
from agpt.trie.plan import assign as assign_partitions
from agpt.trie.radix import LeveledDepth, RadixTrie, expand, prune, radix_from_keys, ranges
from pipelines.stage import StagedFile, write_arrays

MAX_DEPTH_LIMIT = 1024
#: fixed memory kept out of the task budget: the interpreter with numpy, zarr and dask
#: (180-260 MB measured during builds) and the writer's shard buffers (8 arrays x 3 shards
#: of 4 MiB)
BASE_BYTES = 300 << 20


@dataclass(frozen=True)
class BuildConfig:
    """Everything a build depends on; the trie parameters are recorded in the store."""

    max_depth: int
    partition: str = "unigram"
    partition_budget: int | None = None   # start positions per auto partition
    prune_min_mass: int = 0
    prune_min_depth: int = 0
    memory_limit: int = 4 << 30
    workers: int = os.cpu_count() or 1
    scheduler: str = "threads"
    work_dir: str | None = None
    chunk_tokens: int | None = None       # token chunk of the out-of-core passes
    out_of_core: bool | None = None       # None: spill only when the corpus exceeds the budget
    task_keys: int | None = None          # keys per build task (default: from the budget)
    progress: bool = True

    def trie_params(self, budget: int | None) -> dict[str, Any]:
        return {"max_depth": self.max_depth, "partition": self.partition,
                "partition_budget": budget if self.partition == "auto" else None,
                "prune_min_mass": self.prune_min_mass, "prune_min_depth": self.prune_min_depth}


def parse_bytes(text: str | int) -> int:
    """'1GB', '512MiB', '2e9' -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "K": 1 << 10, "M": 1 << 20,
             "G": 1 << 30, "B": 1}
    for u, f in units.items():
        if s.endswith(u):
            try:
                return int(float(s[: -len(u)]) * f)
            except ValueError:
                break
    try:
        return int(float(s))
    except ValueError:
        raise AgptError(f"cannot read memory size {text!r}: write it like 1GB or 512MiB") from None


def bytes_per_key(depth: int, itemsize: int, layer: str) -> int:
    """Peak bytes a build task holds per key, calibrated against measured RSS.

    A radix task peaks at the end of `radix_from_keys`: the sorted keys and LCPs, int32
    node temporaries and the output (up to ~2 nodes per key with int64 fields, edge tokens,
    counts). Measured peaks (RSS over the task's own inputs, order-6 Markov text and
    tinyshakespeare, uint8 keys): 108 / 218 / 267 / 289 B per key at D = 8 / 16 / 32 / 64;
    this formula gives 216 / 248 / 312 / 440 (10-100% headroom for less compressible text).
    The leveled layer adds its expansion, up to D rows of ~72 bytes per key.
    """
    w = (depth + 1) * itemsize
    per = 180 + 4 * w
    if layer == "leveled":
        per += 72 * depth
    return per


def _log(cfg: BuildConfig, msg: str) -> None:
    if cfg.progress:
        print(f"[agpt build] {msg}", file=sys.stderr, flush=True)


def _scheduler(cfg: BuildConfig) -> dict[str, Any]:
    """Keyword arguments for dask.compute: local threads/processes or a distributed cluster."""
    s = cfg.scheduler
    if s.startswith("tcp://") or s.startswith("tls://"):
        try:
            from distributed import Client
            client = Client(s, timeout="5s", set_as_default=False)
        except (OSError, TimeoutError) as e:
            raise AgptError(f"cannot reach Dask scheduler {s}: {e}") from e
        return {"scheduler": client}
    if s not in ("threads", "processes", "synchronous"):
        raise AgptError(f"unknown scheduler {s!r}: use threads, processes, synchronous or tcp://host:port")
    return {"scheduler": s, "num_workers": cfg.workers}


_SCHED: dict[str, dict[str, Any]] = {}


def _compute(cfg: BuildConfig, tasks: list, what: str) -> list:
    if not tasks:
        return []
    kw = _SCHED.get(cfg.scheduler) or _scheduler(cfg)
    if cfg.progress and isinstance(kw["scheduler"], str):
        from dask.diagnostics import ProgressBar
        _log(cfg, f"{what}: {len(tasks)} tasks")
        with ProgressBar(out=sys.stderr, minimum=2):
            return list(dask.compute(*tasks, **kw))
    return list(dask.compute(*tasks, **kw))


# ---------------------------------------------------------------------------------------------
# Start positions and prefix counts
# ---------------------------------------------------------------------------------------------

def _starts(docs: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Start positions in [lo, hi) that have a successor in their document, and doc ends."""
    out, ends = [], []
    for a, b in docs:
        a2, b2 = max(int(a), lo), min(int(b) - 1, hi)  # a start needs i <= b-2
        if a2 < b2:
            out.append(np.arange(a2, b2, dtype=np.int64))
            ends.append(np.full(b2 - a2, int(b), dtype=np.int64))
    if not out:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out), np.concatenate(ends)


def doc_pieces(docs: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The start positions in [lo, hi) as document pieces, relative to lo: starts
    seg_lo[s] .. seg_hi[s]-1 lie in a document that ends at seg_end[s] (a start needs a
    successor, so a document [a, b) has starts a .. b-2)."""
    a, b = docs[:, 0], docs[:, 1]
    first = int(np.searchsorted(b, lo, side="right"))  # documents are sorted and disjoint
    last = int(np.searchsorted(a, hi, side="left"))
    a, b = a[first:last], b[first:last]
    s_lo, s_hi = np.maximum(a, lo), np.minimum(b - 1, hi)
    keep = s_lo < s_hi
    return ((s_lo[keep] - lo).astype(np.int64), (s_hi[keep] - lo).astype(np.int64),
            (b[keep] - lo).astype(np.int64))


class _Chunks:
    """The training stream cut into token chunks, each read with D+1 tokens of look-ahead."""

    def __init__(self, corpus: CorpusStore, size: int, depth: int,
                 resident: np.ndarray | None = None):
        self.corpus = corpus
        self.resident = resident  # the training tokens, when the build keeps them in memory
        self.docs = corpus.train_documents()
        self.end = corpus.train_end
        self.size = size
        self.depth = depth
        self.bounds = list(range(0, self.end, size))

    def pieces(self, lo: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(tokens from lo, document pieces of the starts in [lo, lo+size)), see doc_pieces."""
        hi = min(lo + self.size, self.end)
        stop = min(hi + self.depth + 1, self.end)
        toks = self.resident[lo:stop] if self.resident is not None else self.corpus.tokens(lo, stop)
        return toks, doc_pieces(self.docs, lo, hi)

    def read(self, lo: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens from lo, starts in [lo, lo+size), their document ends)."""
        hi = min(lo + self.size, self.end)
        toks = self.corpus.tokens(lo, min(hi + self.depth + 1, self.end))
        starts, ends = _starts(self.docs, lo, hi)
        return toks, starts, ends


def _count_prefixes_numpy(toks: np.ndarray, pieces: tuple[np.ndarray, ...], K: int, V: int,
                          bins: np.ndarray, off: np.ndarray) -> None:
    """native.count_prefixes in NumPy (for in-memory corpora, which are planned before the
    compiled kernels have loaded)."""
    seg_lo, seg_hi, seg_end = pieces
    n = seg_hi - seg_lo
    starts = ranges(seg_lo, n)
    room = np.repeat(seg_end, n) - starts
    code = np.zeros(len(starts), np.int64)
    for k in range(1, K + 1):
        ok = room >= k
        starts, room, code = starts[ok], room[ok], code[ok]
        code = code * V + toks[starts + (k - 1)]
        bins[off[k - 1]: off[k]] += np.bincount(code, minlength=V ** k)


#: largest k-gram code space that the plan's first pass counts densely (int64 bins)
_DENSE_BINS = 1 << 22


def _plan_counts(chunks: _Chunks, cfg: BuildConfig, V: int,
                 memory: tuple[np.ndarray, np.ndarray] | None):
    """The CountFn for make_plan, with compiled counting passes (agpt.trie.native).

    The first call counts every prefix length k <= K (the largest with V**K dense bins that
    fit _DENSE_BINS) in one pass over the corpus; later lengths (needed only below prefixes
    that split) take one pass each, counting just the children of the split prefixes. A
    100 MB corpus at a 1 GB budget needs two passes instead of one per prefix length.
    memory: (training tokens, document pieces) when the corpus is in memory.
    """
    K = 1
    while K < cfg.max_depth and V ** (K + 1) <= _DENSE_BINS:
        K += 1
    dense: dict[int, np.ndarray] = {}

    def run(fn) -> list:
        if memory is not None:
            return [fn(*memory)]
        return _compute(cfg, [dask.delayed(lambda lo: fn(*chunks.pieces(lo)))(lo)
                              for lo in chunks.bounds], "prefix counts")

    def first_pass() -> None:
        off = np.cumsum([0] + [V ** k for k in range(1, K + 1)]).astype(np.int64)

        def one(toks, pieces) -> tuple[np.ndarray, np.ndarray]:
            bins = np.zeros(int(off[-1]), np.int64)
            if memory is not None:  # small corpus: NumPy, no numba start-up on this thread
                _count_prefixes_numpy(toks, pieces, K, V, bins, off)
            else:
                from agpt.trie import native
                native.count_prefixes(toks, *pieces, K, V, bins, off)
            nz = np.flatnonzero(bins)
            return nz, bins[nz]

        total = np.zeros(int(off[-1]), np.int64)
        for nz, cnt in run(one):
            total[nz] += cnt
        for k in range(1, K + 1):
            dense[k] = total[off[k - 1]: off[k]]

    def counts(k: int, parents: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if k <= K:
            if not dense:
                first_pass()
            codes = np.flatnonzero(dense[k])
            if parents is not None:
                codes = codes[np.isin(codes // V, parents)]
            return codes.astype(np.int64), dense[k][codes]
        par = np.asarray(parents, dtype=np.int64)

        def one(toks, pieces) -> tuple[np.ndarray, np.ndarray]:
            from agpt.trie import native

            bins = np.zeros(len(par) * V, np.int64)
            native.count_children(toks, *pieces, k, V, par, bins)
            nz = np.flatnonzero(bins)
            return nz, bins[nz]

        total = np.zeros(len(par) * V, np.int64)
        for nz, cnt in run(one):
            total[nz] += cnt
        nz = np.flatnonzero(total)
        return par[nz // V] * V + nz % V, total[nz]

    return counts


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------

def _group_tasks(sizes: np.ndarray, task_keys: int, min_tasks: int) -> list[tuple[int, int]]:
    """Consecutive partition ranges with at most task_keys keys each (and >= min_tasks)."""
    return partition_ranges(sizes, task_keys, min_tasks)


@dataclass
class TaskResult:
    """One task's radix trie and, for the leveled layer, its expansion."""

    radix: RadixTrie
    leveled: list[LeveledDepth] | None

    def depth_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.leveled is not None
        return (np.array([L.n_nodes for L in self.leveled], np.int64),
                np.array([len(L.count_value) for L in self.leveled], np.int64))


def _build_from_inputs(inputs: list, prefix_len: np.ndarray, V: int, cfg: BuildConfig,
                       layer: str) -> TaskResult:
    """[keys, klen, local partition ids] -> task result; the list is emptied so that the
    unsorted keys are freed as soon as the sorted copy exists."""
    sk = sort_keys(inputs.pop(0), inputs.pop(0), None, inputs.pop(0), prefix_len)
    return _finish_task(sk, V, cfg, layer)


def _finish_task(sk, V: int, cfg: BuildConfig, layer: str) -> TaskResult:
    rt = radix_from_keys(sk, np.dtype(_token_dtype(V)))
    del sk
    rt = prune(rt, cfg.prune_min_mass, cfg.prune_min_depth)
    return TaskResult(rt, expand(rt, cfg.max_depth) if layer == "leveled" else None)


def _token_dtype(V: int) -> np.dtype:
    from agpt.store.format import token_dtype
    return token_dtype(V)


def _memory_task(tokens, order_starts, order_ends, order_pid, lo: int, hi: int, p0: int,
                 prefix_len: np.ndarray, V: int, cfg: BuildConfig, layer: str) -> TaskResult:
    st, de = order_starts[lo:hi], order_ends[lo:hi]
    keys, klen = gather_keys(tokens, st, de, cfg.max_depth, V)
    inputs = [keys, klen, (order_pid[lo:hi] - p0).astype(np.int32)]
    del keys, klen
    return _build_from_inputs(inputs, prefix_len, V, cfg, layer)


# -- out-of-core: bucket spills and staged results --------------------------------------------

def _klen_dtype(depth: int) -> np.dtype:
    return np.dtype(np.uint8 if depth + 1 <= np.iinfo(np.uint8).max else np.int16)


def _bucket_chunk(chunks: _Chunks, lo: int, n_partitions: int, tables: tuple, V: int,
                  cfg: BuildConfig, out: str) -> str:
    """Write one chunk's keys grouped by partition: keys.npy (or pos.npy, positions in the
    chunk, when the tokens are resident), klen.npy, ptr.npy.

    Two compiled passes: partition ids from the plan's lookup (`assign_tables`), then every
    key written straight from the tokens into its partition's rows (NumPy's row gather and
    argsort by partition cost several times more)."""
    from agpt.trie import native

    done = os.path.join(out, "done")
    if os.path.exists(done):
        return out
    toks, pieces = chunks.pieces(lo)
    n = int((pieces[1] - pieces[0]).sum())
    pid = np.empty(n, np.int32)
    native.assign_pieces(toks, *pieces, *tables, V, cfg.max_depth, pid)
    ptr = np.zeros(n_partitions + 1, np.int64)
    np.cumsum(np.bincount(pid[pid >= 0], minlength=n_partitions), out=ptr[1:])
    klen = np.empty(int(ptr[-1]), _klen_dtype(cfg.max_depth))
    if chunks.resident is not None:  # positions only: tasks read keys from the tokens
        pos = np.empty(int(ptr[-1]), np.int32)
        native.scatter_positions(*pieces, pid, ptr, cfg.max_depth, pos, klen)
        rows = ("pos", pos)
    else:
        keys = np.empty((int(ptr[-1]), cfg.max_depth + 1), key_dtype(V))
        native.scatter_keys(toks, *pieces, pid, ptr, cfg.max_depth, keys, klen)
        rows = ("keys", keys)
    del pid, toks
    os.makedirs(out, exist_ok=True)
    np.save(os.path.join(out, rows[0] + ".npy"), rows[1])
    np.save(os.path.join(out, "klen.npy"), klen)
    np.save(os.path.join(out, "ptr.npy"), ptr)
    Path(done).touch()
    return out


def assign_tables(plan: Plan) -> tuple[np.ndarray, ...]:
    """The plan's prefix lookup for native.assign_pieces: a dense table per prefix length
    whose code space is small (as plan.assign uses), sorted codes with values otherwise."""
    V = plan.vocab_size
    dense, dense_off, codes, vals, code_off = [], [], [], [], [0]
    at = 0
    for k, (pc, ids, split) in enumerate(plan.code_levels(), 1):
        c = np.concatenate((pc, split)).astype(np.int64)
        v = np.concatenate((ids, np.full(len(split), -2))).astype(np.int32)
        if V ** k <= _LUT_MAX:
            t = np.full(V ** k, -1, np.int32)
            t[c] = v
            dense.append(t)
            dense_off.append(at)
            at += V ** k
            code_off.append(code_off[-1])
        else:
            o = np.argsort(c)
            codes.append(c[o])
            vals.append(v[o])
            dense_off.append(-1)
            code_off.append(code_off[-1] + len(c))
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    return (cat(dense, np.int32), np.array(dense_off, np.int64), cat(codes, np.int64),
            cat(vals, np.int32), np.array(code_off, np.int64))


def _read_rows(path: str, a: int, z: int, out: np.ndarray) -> None:
    """Rows a..z-1 of a .npy file straight into `out` (no memory map, no intermediate copy)."""
    with open(path, "rb") as f:
        fmt = np.lib.format
        major, _ = fmt.read_magic(f)
        read_header = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
        shape, _, dtype = read_header(f)
        row = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        f.seek(a * row, os.SEEK_CUR)
        view = memoryview(out.reshape(-1).view(np.uint8))
        got = f.readinto(view)
        if got != (z - a) * row:
            raise AgptError(f"{path} is truncated: rerun the build (the work dir is reused)")


def _spill_task(buckets: list[str], p0: int, p1: int, prefix_len: np.ndarray, V: int,
                cfg: BuildConfig, layer: str, chunks: _Chunks, out: str) -> str:
    """Build partitions p0..p1-1 from the buckets' slices; stage the result (a directory)."""
    from agpt.trie import native

    if os.path.exists(out):
        return out
    spans = []
    for b in buckets:
        ptr = np.load(os.path.join(b, "ptr.npy"))
        a, z = int(ptr[p0]), int(ptr[p1])
        if a < z:
            spans.append((b, a, z, np.diff(ptr[p0: p1 + 1])))
    m = sum(z - a for _, a, z, _ in spans)
    w = cfg.max_depth + 1
    keys = np.empty((m, w), key_dtype(V))
    klen = np.empty(m, _klen_dtype(cfg.max_depth))
    pid = np.empty(m, np.int32)
    at = 0
    for b, a, z, counts in spans:
        _read_rows(os.path.join(b, "klen.npy"), a, z, klen[at: at + z - a])
        if chunks.resident is not None:
            pos = np.empty(z - a, np.int32)
            _read_rows(os.path.join(b, "pos.npy"), a, z, pos)
            lo = chunks.bounds[int(os.path.basename(b))]
            native.gather_keys_at(chunks.resident, lo, pos, klen[at: at + z - a],
                                  keys[at: at + z - a])
            del pos
        else:
            _read_rows(os.path.join(b, "keys.npy"), a, z, keys[at: at + z - a])
        pid[at: at + z - a] = np.repeat(np.arange(p1 - p0, dtype=np.int32), counts)
        at += z - a
    inputs = [keys, klen, pid]
    del keys, klen, pid
    res = _build_from_inputs(inputs, prefix_len, V, cfg, layer)
    _save_result(res, out)
    return out


_LIBC: Any = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
            _LIBC.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


class _KeepHeapMemory:
    """Make glibc serve big arrays from its heap and keep freed memory for reuse.

    By default every array above the mmap threshold is a fresh mmap whose pages fault in on
    first touch and are unmapped on free; a build allocates its task-sized temporaries over
    and over, and on the build VMs those page faults were a third of the build's CPU time.
    With mmap off and no automatic trimming, the heap grows to the largest task's footprint
    (which the memory budget bounds) and is reused from then on; on exit glibc's defaults
    are restored and the heap is trimmed. A no-op off glibc.
    """

    def __enter__(self) -> None:
        if _libc():
            _LIBC.mallopt(-4, 0)            # M_MMAP_MAX: never mmap
            _LIBC.mallopt(-1, 2**31 - 1)    # M_TRIM_THRESHOLD: do not trim on free
            _LIBC.mallopt(-8, 1)            # M_ARENA_MAX: one heap for all threads

    def __exit__(self, *exc: object) -> None:
        if _libc():
            _LIBC.mallopt(-4, 65536)        # glibc's defaults
            _LIBC.mallopt(-1, 128 * 1024)
            _LIBC.mallopt(-8, 0)
            _LIBC.malloc_trim(0)


_RADIX_FIELDS = ("parent", "head", "mass", "edge_ptr", "edge_tokens", "count_ptr",
                 "count_token", "count_value", "part_ptr")
_LEVEL_FIELDS = ("token", "parent", "mass", "count_ptr", "count_token", "count_value", "part_ptr")
#: the int64 fields (staged as int32 when they fit, see _narrow)
_RADIX_DTYPES = dict.fromkeys(("parent", "mass", "edge_ptr", "count_ptr", "count_value",
                               "part_ptr"), np.int64)
_LEVEL_DTYPES = dict.fromkeys(("parent", "mass", "count_ptr", "count_value", "part_ptr"), np.int64)


def _save_result(res: TaskResult, path: str) -> None:
    """Stage a task result (pipelines/stage.py: raw arrays, direct I/O; no compression, no
    checksums: the writer reads it straight back, compresses and checksums once into the
    store)."""
    arrays = {f"r_{f}": getattr(res.radix, f) for f in _RADIX_FIELDS}
    if res.leveled is not None:
        for k, L in enumerate(res.leveled, 1):
            arrays.update({f"l{k}_{f}": getattr(L, f) for f in _LEVEL_FIELDS})
        ds, cs = res.depth_sizes()
        arrays["depth_sizes"], arrays["count_sizes"] = ds, cs
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write_arrays(tmp, {name: _narrow(np.ascontiguousarray(a)) for name, a in arrays.items()})
    os.replace(tmp, path)  # a staged piece exists only once it is whole


def _narrow(a: np.ndarray) -> np.ndarray:
    """int64 -> int32 when the values fit: halves the staged bytes (readers widen them back)."""
    if a.dtype == np.int64 and a.size and -(1 << 31) <= a.min() and a.max() < (1 << 31):
        return a.astype(np.int32)
    return a


def _widen(a: np.ndarray, like: np.dtype) -> np.ndarray:
    return a if a.dtype == like else a.astype(like)


class _Staged:
    """Lazy view of a staged task result (reads only the arrays asked for)."""

    def __init__(self, path: str):
        self.path = path
        self.file = StagedFile(path)

    def _get(self, name: str, dtype: np.dtype | None = None) -> np.ndarray:
        a = self.file.read(name)
        return a if dtype is None else _widen(a, np.dtype(dtype))

    def radix(self) -> RadixTrie:
        return RadixTrie(*(self.column(f) for f in _RADIX_FIELDS))

    def column(self, field: str) -> np.ndarray:
        """One radix array, in the dtype RadixTrie has (staged int32 arrays are widened)."""
        return self._get(f"r_{field}", _RADIX_DTYPES.get(field))

    def radix_sizes(self) -> tuple[int, int, int]:
        return (self.file.length("r_parent"), self.file.length("r_edge_tokens"),
                self.file.length("r_count_value"))

    def level(self, k: int) -> LeveledDepth:
        return LeveledDepth(*(self._get(f"l{k}_{f}", _LEVEL_DTYPES.get(f)) for f in _LEVEL_FIELDS))

    def depth_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.array(self._get("depth_sizes"), dtype=np.int64),
                np.array(self._get("count_sizes"), dtype=np.int64))


# ---------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------

def build_trie(corpus_url: str, out_url: str, layer: str, cfg: BuildConfig,
               force: bool = False) -> dict[str, Any]:
    """Build `layer` ('radix' or 'leveled') of the trie of a corpus store into out_url."""
    with _KeepHeapMemory():
        return _build_trie(corpus_url, out_url, layer, cfg, force)


def _build_trie(corpus_url: str, out_url: str, layer: str, cfg: BuildConfig,
                force: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    if layer == "radix":  # a trie store as SOURCE: compact its leveled layer into it
        from agpt.trie.compact import is_trie_store, radix_from_leveled_store
        if is_trie_store(corpus_url):
            return radix_from_leveled_store(corpus_url, cfg.progress, out_url, cfg.max_depth)
    if layer not in ("radix", "leveled"):
        raise AgptError(f"unknown layer {layer!r}")
    if not 1 <= cfg.max_depth <= MAX_DEPTH_LIMIT:
        raise AgptError(f"--max-depth {cfg.max_depth} is out of range: use 1..{MAX_DEPTH_LIMIT}")
    if cfg.prune_min_mass < 0 or cfg.prune_min_depth < 0:
        raise AgptError("--prune-min-mass and --prune-min-depth must be >= 0")
    if cfg.memory_limit < BASE_BYTES + (64 << 20):
        raise AgptError(f"--memory-limit {cfg.memory_limit} bytes is too small: give at least 400MB")
    if cfg.workers < 1:
        raise AgptError("--workers must be >= 1")
    if cfg.partition == "bigram" and cfg.max_depth < 2:
        raise AgptError("--partition bigram needs --max-depth >= 2; use unigram")
    corpus = open_corpus(corpus_url)
    _SCHED[cfg.scheduler] = _scheduler(cfg)  # connect first: fail before writing anything
    V = corpus.vocab_size
    D = cfg.max_depth
    itemsize = key_dtype(V).itemsize
    per_key = bytes_per_key(D, itemsize, layer)
    task_keys = cfg.task_keys or max(1, (cfg.memory_limit - BASE_BYTES) // (cfg.workers * per_key))
    n_train = corpus.train_end
    # The in-memory path keeps the training tokens and one int64 triple per start resident.
    in_memory = n_train * (itemsize + 40) + min(n_train, task_keys * cfg.workers) * per_key \
        <= cfg.memory_limit - BASE_BYTES
    if cfg.out_of_core is not None:
        in_memory = not cfg.out_of_core
    if in_memory:  # out of core, the first task's load is a small part of the build
        _warm_up_kernels(V, D)
    budget = cfg.partition_budget or (task_keys if cfg.partition == "auto" else None)
    writer = TrieWriter(out_url, corpus, cfg.trie_params(budget), force=force)
    if writer.has_layer(layer):
        _log(cfg, f"{out_url} already has a complete {layer} layer; nothing to do")
        return {"store": out_url, "layer": layer, "skipped": True, **writer.meta.get("totals", {})}

    chunk = cfg.chunk_tokens or max(1 << 16, min(1 << 24, (cfg.memory_limit - BASE_BYTES)
                                                 // (cfg.workers * (per_key + 16))))
    # Out of core, the training tokens stay in memory when they are a small part of the
    # budget (threads share them): buckets then hold 4-byte positions instead of (D+1)-token
    # keys, a tenth of the spill I/O, and tasks read their keys from the tokens. The tasks'
    # share of the budget shrinks by the tokens' size (the partitions stay the same).
    token_bytes = n_train * corpus.dtype.itemsize
    resident = (not in_memory and cfg.scheduler == "threads"
                and token_bytes <= (cfg.memory_limit - BASE_BYTES) // 6)
    if resident and not cfg.task_keys:
        task_cap = max(1, (cfg.memory_limit - BASE_BYTES - token_bytes) // (cfg.workers * per_key))
    else:
        task_cap = task_keys
    chunks = _Chunks(corpus, chunk, D, corpus.train_tokens() if resident else None)
    memory = None
    if in_memory:
        toks = corpus.train_tokens()
        starts, ends = _starts(chunks.docs, 0, n_train)
        memory = (toks, starts, ends)
    plan_memory = (memory[0], doc_pieces(chunks.docs, 0, n_train)) if memory else None
    plan = make_plan(cfg.partition, _plan_counts(chunks, cfg, V, plan_memory), V, D, budget)
    if plan.n_partitions == 0:
        raise AgptError(f"{corpus_url} has no training start positions (fewer than 2 tokens per document)")
    biggest = int(plan.sizes.max())
    if biggest > task_keys:
        p = int(plan.sizes.argmax())
        msg = (f"partition {plan.prefixes[p]} has {biggest:,} start positions; building it needs "
               f"~{biggest * per_key / 1e6:.0f} MB per worker, over the memory limit")
        if cfg.partition != "auto" or len(plan.prefixes[p]) < D:
            raise AgptError(msg + ": use --partition auto, fewer --workers, or a larger --memory-limit")
        _log(cfg, "warning: " + msg + " (a single depth-D leaf cannot be split)")
    if writer.fresh or "partitions" not in writer.meta:
        writer.write_plan(plan)
    prefix_len = np.array([len(p) for p in plan.prefixes], dtype=np.int16)
    tasks_ranges = _group_tasks(plan.sizes, task_cap, cfg.workers if in_memory else 1)
    _log(cfg, f"{plan.n_partitions} {cfg.partition} partitions, {len(plan.spine_depth)} spine "
              f"nodes, {len(tasks_ranges)} build tasks ({'in memory' if in_memory else 'spilled to disk'})")

    if in_memory:
        toks, starts, ends = memory
        klen0 = np.minimum(ends - starts, D + 1)
        pid = assign_partitions(plan, toks, starts, klen0)
        keep = pid >= 0
        order = np.argsort(pid[keep], kind="stable")
        st, de, pd_ = starts[keep][order], ends[keep][order], pid[keep][order]
        bounds = np.searchsorted(pd_, np.arange(plan.n_partitions + 1))
        t_tok = dask.delayed(toks, pure=False)
        jobs = [dask.delayed(_memory_task, pure=False)(
            t_tok, st, de, pd_, int(bounds[a]), int(bounds[b]), a, prefix_len[a:b], V, cfg, layer)
            for a, b in tasks_ranges]
        results: list[Any] = _compute(cfg, jobs, "build")
        radix_pieces = [r.radix for r in results]
        level_of = [(lambda k, r=r: r.leveled[k - 1]) for r in results]
        sizes = [r.depth_sizes() for r in results] if layer == "leveled" else []
        work = None
    else:
        work = _work_dir(cfg, out_url, corpus, writer.params, chunk)
        _check_layout(work, "tokens" if resident else "keys")
        _log(cfg, f"work dir {work}")
        bdir = os.path.join(work, "buckets")
        # not the plan itself: dask walks a dataclass argument's fields, 10 ms per task here
        tables = assign_tables(plan)
        bjobs = [dask.delayed(_bucket_chunk, pure=False)(chunks, lo, plan.n_partitions, tables,
                                                         V, cfg, os.path.join(bdir, f"{i:06d}"))
                 for i, lo in enumerate(chunks.bounds)]
        buckets = _compute(cfg, bjobs, "bucket")
        sdir = os.path.join(work, f"stage-{layer}")
        os.makedirs(sdir, exist_ok=True)
        jobs = [dask.delayed(_spill_task, pure=False)(buckets, a, b, prefix_len[a:b], V, cfg, layer,
                                                      chunks, os.path.join(sdir, f"{i:06d}"))
                for i, (a, b) in enumerate(tasks_ranges)]
        staged = [_Staged(p) for p in _compute(cfg, jobs, "build")]
        level_of = [s.level for s in staged]
        sizes = [s.depth_sizes() for s in staged] if layer == "leveled" else []

    _log(cfg, f"writing the {layer} layer")
    if layer == "radix":
        if in_memory:
            totals = writer.write_radix(radix_pieces, _radix_totals(radix_pieces))
        else:
            sz = [s.radix_sizes() for s in staged]
            totals = dict(zip(("nodes", "edge_tokens", "counts"),
                              map(int, np.array(sz, np.int64).reshape(-1, 3).sum(axis=0)), strict=True))
            totals = writer.write_radix_columns(
                len(staged), lambda i, f: staged[i].column(f), sz,
                [staged[i].column("part_ptr") for i in range(len(staged))], totals)
    else:
        ds = np.stack([s[0] for s in sizes])
        cs = np.stack([s[1] for s in sizes])
        totals = writer.write_leveled(level_of, ds, cs)
    writer.finish()
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)
    secs = time.perf_counter() - t0
    _log(cfg, f"done in {secs:.2f} s: {json.dumps(totals)[:200]}")
    return {"store": out_url, "layer": layer, "seconds": secs, "partitions": plan.n_partitions,
            **totals}


def _warm_up_kernels(V: int, D: int) -> None:
    """Load the compiled build kernels on a background thread while the build plans (the
    first load initialises numba, ~0.5 s); the first task waits for it if it must."""
    import threading

    def run() -> None:  # klen is int64 in memory (gather_keys)
        from agpt.trie import native
        native.warm_up(key_dtype(V), np.dtype(np.int64), _token_dtype(V), D)

    threading.Thread(target=run, name="agpt-warm-up", daemon=True).start()


def _radix_totals(pieces) -> dict[str, int]:
    n = e = c = 0
    for rt in pieces:
        n += rt.n_nodes
        e += len(rt.edge_tokens)
        c += len(rt.count_value)
    return {"nodes": n, "edge_tokens": e, "counts": c}


#: layout of the bucket and stage files; a work dir of another layout is never reused
_SPILL_LAYOUT = 4


def _check_layout(work: str, mode: str) -> None:
    """Start the work dir afresh when it was left by a build with another file layout (or
    bucket mode: keys, or positions into resident tokens)."""
    mark = os.path.join(work, "layout")
    want = f"{_SPILL_LAYOUT} {mode}"
    try:
        with open(mark) as f:
            ok = f.read().strip() == want
    except OSError:
        ok = False
    if not ok:
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work, exist_ok=True)
        with open(mark, "w") as f:
            f.write(want)


def _work_dir(cfg: BuildConfig, out_url: str, corpus: CorpusStore, params: dict, chunk: int) -> str:
    """Staging directory, stable across reruns of the same build (that is what resumes it)."""
    key = hashlib.sha256(json.dumps([out_url, corpus.meta["corpus_sha256"], params,
                                     chunk], sort_keys=True).encode()).hexdigest()[:16]
    if cfg.work_dir:
        return os.path.join(cfg.work_dir, f"agpt-build-{key}")
    if "://" not in out_url:
        return os.path.abspath(out_url.rstrip("/")) + ".work"
    return os.path.join(os.path.expanduser("~/.cache/agpt"), f"build-{key}")


