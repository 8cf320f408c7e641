"""The CuPy backend: the model's operations on the GPU.

It inherits the NumPy reference (agpt/backend/reference.py, written against `self.xp`) and
replaces the hot operations with the kernels of agpt/gpu/kernels.py, each tested against the
reference method it replaces (tests/test_gpu_kernels.py, tests/test_gpu_backend.py): scoped
tree attention and its aggregated backward (parent pointers, no ancestor gathers), LayerNorm,
the embedding gradient, and the products with a thin inner dimension fused with the pass that
follows them (q|k|v with bias and RoPE, bias + ReLU, the residual adds, the masked ReLU
gradient with its bias gradient: `thin_gemm`, full fp32 whether or not TF32 is on). The
other matmuls go to cuBLAS (agpt/gpu/blas.py), adding into gradients in place (TF32 on
request).
Uploads made inside `staged()` go through pinned host memory on a side stream, so a loader
thread fills the next unit while the GPU computes the current one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

try:
    import cupy as cp
except ImportError:  # pragma: no cover - CI has no CuPy
    cp = None

from agpt.backend.reference import NumpyBackend
from agpt.gpu.tiles import TileLayout, host_tiles
from agpt.model.layout import ParentTree

#: TF32 rounds matmul inputs to 10 mantissa bits (relative 2^-11 per product); measured bound on
#: the gradient of the GPU tests: see docs/GPU_TESTS.md
TF32_NOTE = "TF32 matmuls: inputs rounded to 10-bit mantissas"


def gpu_available() -> bool:
    if cp is None:
        return False
    try:
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no driver / no device
        return False


def set_tf32(on: bool) -> None:
    """cuBLAS float32 matmuls on TF32 tensor cores (on) or in full fp32 (off, the default)."""
    from cupy._core import _routines_linalg as linalg
    linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32 if on
                            else linalg.COMPUTE_TYPE_DEFAULT)


class CupyBackend(NumpyBackend):
    name = "cupy"
    chunk_rows = 1 << 22      # the GPU wants big batches; the memory budget still bounds them
    stage_in_background = True

    def __init__(self, dtype: Any = "float32", tf32: bool = False):
        super().__init__(dtype)
        from agpt.gpu import blas, kernels
        self.k = kernels
        self.blas = blas
        self.xp = cp
        self.tf32 = tf32
        set_tf32(tf32)
        self._local = threading.local()
        self._rope: dict[tuple[int, int, float], tuple[Any, Any]] = {}
        self._ones = cp.ones(0, dtype=self.dtype)
        self._old_ones: list[Any] = []
        self._capture: tuple[Any, Any] | None = None

    # -- transfers ------------------------------------------------------------------------
    def asarray(self, a: Any, dtype: Any = None):
        if getattr(self._local, "pins", None) is None or not isinstance(a, np.ndarray):
            return cp.asarray(a, dtype=dtype)
        return self.asarrays([np.asarray(a, dtype=dtype)])[0]

    def asarrays(self, arrays: list[np.ndarray]) -> list[Any]:
        """Host arrays on the device, dtypes kept. Inside staged(): one copy into the pinned
        arena and one upload for all of them (views of one device allocation, 256-byte
        aligned), not an allocation and a copy per array."""
        if getattr(self._local, "pins", None) is None:
            return [cp.asarray(a) for a in arrays]
        arrays = [np.ascontiguousarray(a) for a in arrays]
        offsets, total = [], 0
        for a in arrays:
            offsets.append(total)
            total += -(-a.nbytes // 256) * 256
        if not total:
            return [cp.empty(a.shape, a.dtype) for a in arrays]
        pinned = self._pinned(total)
        for a, o in zip(arrays, offsets, strict=True):
            pinned[o:o + a.nbytes].view(a.dtype).reshape(a.shape)[...] = a
        dev = cp.empty(total, cp.uint8)
        dev.set(pinned, stream=cp.cuda.get_current_stream())
        return [cp.ndarray(a.shape, a.dtype, memptr=dev.data + o)
                for a, o in zip(arrays, offsets, strict=True)]

    def _pinned(self, nbytes: int) -> np.ndarray:
        """nbytes of this thread's pinned staging arena (a uint8 view), valid until staged()
        returns. The arena grows by doubling and is reused unit after unit: page-locking fresh
        host memory for every array costs more than the copy itself."""
        loc = self._local
        off = -(-loc.offset // 256) * 256
        if loc.arena is None or off + nbytes > len(loc.arena):
            if loc.arena is not None:
                loc.pins.append(loc.arena)          # queued copies still read it
            size = max(nbytes, 2 * (len(loc.arena) if loc.arena is not None else 0), 64 << 20)
            loc.arena = np.frombuffer(cp.cuda.alloc_pinned_memory(size), np.uint8, size)
            off = 0
        loc.offset = off + nbytes
        return loc.arena[off:off + nbytes]

    @contextmanager
    def staged(self) -> Iterator[None]:
        """Uploads inside go through this thread's pinned arena on its own stream; returns
        once they are on the device."""
        loc = self._local
        if getattr(loc, "stream", None) is None:
            loc.stream = cp.cuda.Stream(non_blocking=True)
            loc.arena = None
        loc.pins, loc.offset = [], 0
        try:
            with loc.stream:
                yield
            loc.stream.synchronize()
        finally:
            loc.pins = None

    def to_host(self, a: Any) -> np.ndarray:
        return cp.asnumpy(a) if isinstance(a, cp.ndarray) else np.asarray(a)

    def copy_arrays(self, dst: list[Any], src: list[Any]) -> None:
        """One device-to-device memcpy per array on the current stream: an elementwise copy
        is a kernel launch through CuPy, several times the host time, and a streamed unit's
        class graph (agpt.train.graphs) copies ~15 arrays before each replay."""
        stream = cp.cuda.get_current_stream().ptr
        kind = cp.cuda.runtime.memcpyDeviceToDevice
        for d, s in zip(dst, src, strict=True):
            if d.shape != s.shape or d.dtype != s.dtype:
                raise ValueError(f"copy_arrays: {s.dtype}{s.shape} into {d.dtype}{d.shape}")
            if not (d.flags.c_contiguous and s.flags.c_contiguous):
                d[...] = s
            elif s.nbytes:
                cp.cuda.runtime.memcpyAsync(d.data.ptr, s.data.ptr, s.nbytes, kind, stream)

    def fetch(self, a: Any) -> tuple[np.ndarray, Any]:
        """(host, done): `a` copied into pinned host memory behind the work queued so far on
        the current stream, and the event after the copy; `host` holds it once `done` has
        happened. `to_host` (cp.asnumpy) waits for the whole stream instead: the trainer's
        update checks, reading stats the device had long computed, drained the host's lead
        on the device each time (streamed D=32 epochs idled the GPU ~0.25 s)."""
        a = cp.ascontiguousarray(a)
        host = np.frombuffer(cp.cuda.alloc_pinned_memory(a.nbytes), a.dtype, a.size)
        a.data.copy_to_host_async(host.ctypes.data, a.nbytes)
        return host.reshape(a.shape), self.record()

    def tree_layout(self, parent: np.ndarray, depth: np.ndarray, max_depth: int | None = None,
                    fixed: bool = False, tiles: TileLayout | None = None) -> ParentTree:
        """Rows and their attention tiles on the device. The tiles are laid out on the host
        (agpt/gpu/tiles.py, which also checks the preorder), unless `tiles` brings them
        already (a worker process made them from the same rows)."""
        if tiles is None:
            tiles = host_tiles(parent, depth, max_depth, fixed=fixed)
        p, d, anc, bidx, brow = self.asarrays([np.asarray(parent, np.int32),
                                               np.asarray(depth, np.int32), *tiles.arrays()])
        return ParentTree(p, d, tiles.max_depth, TileLayout(tiles.tile, anc, bidx, brow,
                                                            tiles.max_depth))

    def synchronize(self) -> None:
        cp.cuda.get_current_stream().synchronize()

    def capture(self, fn: Any) -> tuple[Any, Any]:
        """(graph, out): fn()'s launches captured as one CUDA graph (nothing runs yet;
        `graph.launch()` replays them on the current stream, ~0.1 ms instead of ~300 launches
        from Python). Its temporaries come from a private pool that only captures use: graphs
        replay one at a time on one stream, so they share it, and the pool never hands their
        addresses to anything else. The pool has no cap: a cap makes CuPy free cached blocks
        in the middle of a capture, which invalidates it; the caller sizes what it captures
        (trie_trainer: GpuPlan.graphs). What fn() returns must be kept alive with the graph
        (every replay writes it)."""
        if self._capture is None:
            pool = cp.cuda.MemoryPool()
            self._capture = (pool, cp.cuda.Stream(non_blocking=True))
        pool, stream = self._capture
        mode = getattr(cp.cuda.runtime, "streamCaptureModeRelaxed", None)
        with cp.cuda.using_allocator(pool.malloc), stream:
            stream.begin_capture(*(() if mode is None else (mode,)))
            try:
                out = fn()
            except BaseException:
                try:                 # end the capture, then report fn's error, not this one
                    stream.end_capture()
                except Exception:  # noqa: BLE001, S110 - the partial graph is discarded
                    pass
                pool.free_all_blocks()
                raise
            graph = stream.end_capture()
        return graph, out

    def graph_pool_bytes(self) -> int:
        return 0 if self._capture is None else int(self._capture[0].total_bytes())

    def record(self) -> Any:
        """An event marking the work queued so far on the current stream."""
        ev = cp.cuda.Event(disable_timing=True)
        ev.record()
        return ev

    def bytes_per_row(self, cfg: Any, depth: int) -> int:
        """Saved activations per layer (no ancestor gathers; relu(f + b) kept, not f), the
        float64 K/V gradient accumulators and other backward temporaries, logits."""
        d, f, h = cfg.d_model, cfg.d_ff, cfg.n_heads
        per_layer = 9 * d + f + h + 2
        transient = 14 * d + 2 * f
        return self.dtype.itemsize * (cfg.n_layers * per_layer + transient + 3 * cfg.vocab_size) + 96

    def peak_memory(self) -> int:
        """Bytes the memory pools hold (their high-water marks: freed blocks stay cached)."""
        return int(cp.get_default_memory_pool().total_bytes()) + self.graph_pool_bytes()

    # -- kernels ----------------------------------------------------------------------------
    def matmul(self, a, b, *, ta=False, tb=False, out=None, acc=False):
        return self.blas.gemm(a, b, ta, tb, out, acc, self.tf32)

    def sum_rows(self, x, out=None):
        """ones @ x on cuBLAS (added into out when given): CuPy's axis-0 reduction of a tall
        (N, d) array is ~60x slower."""
        n = x.shape[0]
        if len(self._ones) < n or self._ones.dtype != x.dtype:
            # the old vector stays alive: a CUDA graph captured with it still reads it, and
            # freed, its memory could go to another capture's temporaries
            self._old_ones.append(self._ones)
            self._ones = cp.ones(max(n, 2 * len(self._ones)), dtype=x.dtype)
        ones = self._ones[None, :n]
        if out is None:
            return self.blas.gemm(ones, x, tf32=self.tf32)[0]
        self.blas.gemm(ones, x, out=out[None, :], acc=True, tf32=self.tf32)
        return out

    def optimizer_update(self, cfg, params, grad, slots, lr, t, z, loss_sum):
        """Optimizer.update in two kernels and a memset (its generic code is the reference)."""
        return self.k.optimizer_update(cfg, params, grad, slots, lr, t, z, loss_sum)

    def gather_rows(self, table, idx):
        return self.k.gather_rows(table, idx)

    def add_bias(self, x, b):
        return self.k.add_bias(x, b.astype(x.dtype, copy=False))

    def bias_relu(self, f, b):
        return self.k.bias_relu(f, b.astype(f.dtype, copy=False))

    def relu_backward(self, dr, r, db=None):
        df, part = self.k.relu_backward(dr, r, db is not None)
        if db is not None:
            self.sum_rows(df if part is None else part, out=db)
        return df

    def linear_relu(self, x, w, b):
        # one pass instead of a cuBLAS product plus a bias+ReLU pass over the (N, d_ff) result
        if self.k.thin_applies(x, w, False, b):
            return self.k.linear_relu(x, w, b)
        return super().linear_relu(x, w, b)

    def relu_linear_backward(self, dy, w, r, db):
        if self.k.thin_applies(dy, w, True, r):
            df, part = self.k.relu_linear_backward(dy, w, r)
            self.sum_rows(part, out=db)
            return df
        return super().relu_linear_backward(dy, w, r, db)

    def add_linear(self, out, x, w, b):
        if self.k.thin_applies(x, w, False, b, out):
            return self.k.add_linear(out, x, w, b)
        return super().add_linear(out, x, w, b)

    def layernorm(self, x, g, b, eps):
        return self.k.layernorm(cp.ascontiguousarray(x), g.astype(x.dtype, copy=False),
                                b.astype(x.dtype, copy=False), eps)

    def layernorm_backward(self, dy, cache, g, dg, db, dx=None):
        return self.k.layernorm_backward(cp.ascontiguousarray(dy), cache,
                                         g.astype(dy.dtype, copy=False), dg, db, dx)

    def rope_tables(self, layout: Any, head_dim: int, base: float):
        """(pos, (cos, sin) tables of every position up to the layout's longest)."""
        key = (head_dim, layout.max_pos + 1, base)
        if key not in self._rope:
            inv = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
            ang = np.arange(layout.max_pos + 1, dtype=np.float64)[:, None] * inv[None, :]
            self._rope[key] = (cp.asarray(np.cos(ang), self.dtype), cp.asarray(np.sin(ang), self.dtype))
        return cp.asarray(layout.pos, dtype=cp.int32), self._rope[key]

    def rope(self, x, cos, sin, inverse=False):
        pos, (ct, st) = cos, sin
        return self.k.rope(cp.ascontiguousarray(x), pos, ct.astype(x.dtype, copy=False),
                           st.astype(x.dtype, copy=False), inverse)

    def qkv_heads(self, qkv, bias, rope, n_heads):
        pos, (ct, st) = rope
        return self.k.qkv_heads(cp.ascontiguousarray(qkv), bias.astype(qkv.dtype, copy=False),
                                pos, ct, st, n_heads)

    def qkv_projection(self, x, w, b, rope, n_heads):
        pos, (ct, st) = rope
        e = w.shape[1] // 3 // n_heads
        if e % 2 == 0 and self.k.thin_applies(x, w, False, b, ct, st):
            return self.k.qkv_projection(x, w, b, pos, ct, st, n_heads)
        return super().qkv_projection(x, w, b, rope, n_heads)

    def qkv_heads_backward(self, dq, dk, dv, rope):
        pos, (ct, st) = rope
        dk, dv = cp.ascontiguousarray(dk), cp.ascontiguousarray(dv.astype(dk.dtype, copy=False))
        return self.k.qkv_heads_backward(cp.ascontiguousarray(dq), dk, dv, pos, ct, st)

    def tree_attention(self, q, k, v, tree: ParentTree):
        q, k, v = (cp.ascontiguousarray(a) for a in (q, k, v))
        o, lse = self.k.tree_attention(q, k, v, tree.parent, tree.depth, tree.tiles)
        return o, (o, lse)

    def tree_attention_backward(self, do, q, k, v, att, tree: ParentTree, truncated=False):
        o, lse = att
        return self.k.tree_attention_backward(cp.ascontiguousarray(do), q, k, v, o, lse,
                                              tree.parent, tree.depth, tree.tiles, truncated)

    def xent_counts(self, logits, row, token, coef, row_coef):
        i64 = cp.int64
        return self.k.xent_counts(cp.ascontiguousarray(logits), row.astype(i64, copy=False),
                                  token.astype(i64, copy=False), coef.astype(logits.dtype, copy=False),
                                  row_coef.astype(logits.dtype, copy=False))

    def scatter_add(self, dst, idx, src) -> None:
        if dst.ndim == 2 and src.ndim == 2 and self.k.embedding_backward(dst, idx, src):
            return
        cp.add.at(dst, idx, src)
