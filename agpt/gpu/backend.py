"""The CuPy backend: the reference operations on the GPU.

It inherits every operation of the NumPy reference (agpt/backend/reference.py, written against
`self.xp`) and overrides what CuPy lacks or does differently: transfers, the layout's index
arrays on the device, the segmented sum of the K/V aggregation and the scatter-add of the
embedding gradient. This is the first, plain version: correct and batched per layer (cuBLAS
matmuls, CuPy elementwise kernels); fused RawKernels for scoped attention come next, each
tested against the same reference method.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

try:
    import cupy as cp
except ImportError:  # pragma: no cover - CI has no CuPy
    cp = None

from agpt.backend.reference import NumpyBackend
from agpt.model.layout import TreeLayout


def gpu_available() -> bool:
    if cp is None:
        return False
    try:
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no driver / no device
        return False


class CupyBackend(NumpyBackend):
    name = "cupy"
    chunk_rows = 1 << 20      # the GPU wants big batches; the memory budget still bounds them

    def __init__(self, dtype: Any = "float32"):
        super().__init__(dtype)
        self.xp = cp

    def asarray(self, a: Any, dtype: Any = None):
        return cp.asarray(a, dtype=dtype)

    def to_host(self, a: Any) -> np.ndarray:
        return cp.asnumpy(a) if isinstance(a, cp.ndarray) else np.asarray(a)

    def prepare(self, layout: Any) -> Any:
        if isinstance(layout, TreeLayout):
            return replace(layout, depth=cp.asarray(layout.depth), anc=cp.asarray(layout.anc),
                           level=[cp.asarray(x) for x in layout.level])
        return layout

    def synchronize(self) -> None:
        cp.cuda.get_current_stream().synchronize()

    def segment_sum(self, y, starts):
        """Contiguous segments: differences of a float64 prefix sum (exact to ~1e-16 of the
        running total, far below fp32 rounding)."""
        c = cp.empty((y.shape[0] + 1, y.shape[1]), dtype=cp.float64)
        c[0] = 0
        cp.cumsum(y, axis=0, dtype=cp.float64, out=c[1:])
        ends = cp.concatenate([starts[1:], cp.asarray([y.shape[0]], dtype=starts.dtype)])
        return (c[ends] - c[starts]).astype(y.dtype)

    def scatter_add(self, dst, idx, src) -> None:
        cp.add.at(dst, idx, src)     # CuPy >= 14 (cupyx.scatter_add is deprecated)

    def peak_memory(self) -> int:
        return int(cp.get_default_memory_pool().total_bytes())
