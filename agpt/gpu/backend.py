"""The CuPy backend: the model's operations on the GPU.

It inherits the NumPy reference (agpt/backend/reference.py, written against `self.xp`) and
replaces the hot operations with the kernels of agpt/gpu/kernels.py, each tested against the
reference method it replaces (tests/test_gpu_backend.py): scoped tree attention and its
aggregated backward (parent pointers, no ancestor gathers), LayerNorm, RoPE and the
embedding gradient. (The segmented-sum aggregation of the reference is not used: the attention
backward kernel aggregates.) Matmuls go to cuBLAS through `cupy.matmul` (TF32 on request).
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
        from agpt.gpu import kernels
        self.k = kernels
        self.xp = cp
        self.tf32 = tf32
        set_tf32(tf32)
        self._local = threading.local()
        self._rope: dict[tuple[int, int, float], tuple[Any, Any]] = {}
        self._ones = cp.ones(0, dtype=self.dtype)

    # -- transfers ------------------------------------------------------------------------
    def asarray(self, a: Any, dtype: Any = None):
        pins = getattr(self._local, "pins", None)
        if pins is None or not isinstance(a, np.ndarray):
            return cp.asarray(a, dtype=dtype)
        host = np.ascontiguousarray(a, dtype=dtype)
        mem = cp.cuda.alloc_pinned_memory(max(1, host.nbytes))
        pinned = np.frombuffer(mem, host.dtype, host.size).reshape(host.shape)
        pinned[...] = host
        pins.append(mem)                 # alive until the copy is done (staged() syncs)
        out = cp.empty(host.shape, host.dtype)
        out.set(pinned, stream=cp.cuda.get_current_stream())
        return out

    @contextmanager
    def staged(self) -> Iterator[None]:
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = cp.cuda.Stream(non_blocking=True)
        self._local.pins = []
        try:
            with stream:
                yield
            stream.synchronize()
        finally:
            self._local.pins = None

    def to_host(self, a: Any) -> np.ndarray:
        return cp.asnumpy(a) if isinstance(a, cp.ndarray) else np.asarray(a)

    def tree_layout(self, parent: np.ndarray, depth: np.ndarray) -> ParentTree:
        t = ParentTree(self.asarray(parent, np.int32), self.asarray(depth, np.int32),
                       int(depth.max()) if len(depth) else 1)
        if int(self.k.check_preorder(t.parent, t.depth)[0]):
            raise ValueError("rows are not a forest in depth-first preorder")
        t.tiles = self.k.tree_tiles(t.parent, t.depth, t.max_depth)
        return t

    def synchronize(self) -> None:
        cp.cuda.get_current_stream().synchronize()

    def bytes_per_row(self, cfg: Any, depth: int) -> int:
        """Saved activations per layer (no ancestor gathers), the float64 K/V gradient
        accumulators and other backward temporaries, logits."""
        d, f, h = cfg.d_model, cfg.d_ff, cfg.n_heads
        per_layer = 9 * d + 2 * f + h + 2
        transient = 14 * d + 2 * f
        return self.dtype.itemsize * (cfg.n_layers * per_layer + transient + 3 * cfg.vocab_size) + 96

    def peak_memory(self) -> int:
        """Bytes the memory pool holds (its high-water mark: freed blocks stay cached)."""
        return int(cp.get_default_memory_pool().total_bytes())

    # -- kernels ----------------------------------------------------------------------------
    def sum_rows(self, x):
        """ones @ x on cuBLAS: CuPy's axis-0 reduction of a tall (N, d) array is ~60x slower."""
        n = x.shape[0]
        if len(self._ones) < n or self._ones.dtype != x.dtype:
            self._ones = cp.ones(max(n, 2 * len(self._ones)), dtype=x.dtype)
        return self._ones[:n] @ x

    def relu(self, f):
        return self.k.relu(f)

    def relu_backward(self, dr, f):
        return self.k.relu_backward(dr, f)

    def layernorm(self, x, g, b, eps):
        return self.k.layernorm(cp.ascontiguousarray(x), g.astype(x.dtype, copy=False),
                                b.astype(x.dtype, copy=False), eps)

    def layernorm_backward(self, dy, cache, g):
        return self.k.layernorm_backward(cp.ascontiguousarray(dy), cache,
                                         g.astype(dy.dtype, copy=False))

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

    def tree_attention(self, q, k, v, tree: ParentTree):
        q, k, v = (cp.ascontiguousarray(a) for a in (q, k, v))
        o, lse = self.k.tree_attention(q, k, v, tree.parent, tree.depth, tree.tiles)
        return o, (o, lse)

    def tree_attention_backward(self, do, q, k, v, att, tree: ParentTree, truncated=False):
        o, lse = att
        return self.k.tree_attention_backward(cp.ascontiguousarray(do), q, k, v, o, lse,
                                              tree.parent, tree.depth, tree.tiles, truncated)

    def scatter_add(self, dst, idx, src) -> None:
        if dst.ndim == 2 and src.ndim == 2 and self.k.embedding_backward(dst, idx, src):
            return
        cp.add.at(dst, idx, src)
