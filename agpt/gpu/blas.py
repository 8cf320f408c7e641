"""Row-major matrix products on cuBLAS, with accumulation and strided operands.

`cupy.matmul` allocates its result and cannot add into an existing array, so every
`grad += a.T @ b` and every residual `x += o @ W` cost a product, a temporary and an
elementwise add. `gemm` calls cublasGemmEx directly: it writes or adds (beta = 1) into any
2-D view with a unit inner stride (a slice of the flat gradient, a column block of a wider
array), in fp32, TF32 (tensor cores, inputs rounded to 10-bit mantissas) or float64.
Reference semantics: `NumpyBackend.matmul` (agpt/backend/reference.py).

The calls go through ctypes to the cuBLAS library CuPy loaded (same handle): CuPy's own
wrappers refuse to run while a stream is being captured, and the trainer captures each small
unit's forward and backward as a CUDA graph (cuBLAS itself supports capture).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

import cupy as cp
import numpy as np
from cupy.cuda import device, runtime
from cupy_backends.cuda.libs import cublas

_ONE = {np.dtype(np.float32): np.ones(1, np.float32), np.dtype(np.float64): np.ones(1, np.float64)}
_ZERO = {k: np.zeros(1, k) for k in _ONE}
_DATA = {np.dtype(np.float32): runtime.CUDA_R_32F, np.dtype(np.float64): runtime.CUDA_R_64F}
_COMPUTE_32F = getattr(cublas, "CUBLAS_COMPUTE_32F", 68)
_COMPUTE_TF32 = getattr(cublas, "CUBLAS_COMPUTE_32F_FAST_TF32", 77)
_COMPUTE_64F = getattr(cublas, "CUBLAS_COMPUTE_64F", 70)


@functools.cache
def _lib() -> ctypes.PyDLL:
    """The cuBLAS shared library this process already uses (found in its memory map).

    Loaded as a PyDLL, so a call keeps the GIL: a product only queues work (microseconds),
    and releasing the GIL there let busy loader threads take it, after which the trainer
    thread waited for it back (up to the 5 ms switch interval) at every product."""
    device.get_cublas_handle()                 # makes CuPy load it
    path = None
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                name = line.rsplit("/", 1)[-1]
                if name.startswith("libcublas.so"):
                    path = line.split(None, 5)[-1].strip()
                    break
    except OSError:
        pass
    lib = ctypes.PyDLL(path or ctypes.util.find_library("cublas") or "libcublas.so")
    vp, i = ctypes.c_void_p, ctypes.c_int
    lib.cublasSetStream_v2.argtypes = [vp, vp]
    lib.cublasGemmEx.argtypes = [vp, i, i, i, i, i, vp, vp, i, i, vp, i, i, vp, vp, i, i, i, i]
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed with cuBLAS status {status}")


def _ld(a: Any) -> int:
    """Leading dimension (row stride in elements) of a row-major 2-D view."""
    if a.ndim != 2 or (a.shape[1] > 1 and a.strides[1] != a.itemsize):
        raise ValueError(f"gemm needs 2-D operands with unit inner stride, got {a.shape} {a.strides}")
    return max(a.strides[0] // a.itemsize, a.shape[1], 1) if a.shape[0] > 1 else max(a.shape[1], 1)


def gemm(a: Any, b: Any, ta: bool = False, tb: bool = False, out: Any = None,
         acc: bool = False, tf32: bool = False) -> Any:
    """op(a) @ op(b) (op transposes when ta / tb), written into `out` or added to it (acc)."""
    m, k = (a.shape[1], a.shape[0]) if ta else a.shape
    kb, n = (b.shape[1], b.shape[0]) if tb else b.shape
    if k != kb or a.dtype != b.dtype:
        raise ValueError(f"gemm: shapes {a.shape}{'ᵀ' if ta else ''} @ {b.shape}"
                         f"{'ᵀ' if tb else ''} or dtypes {a.dtype}, {b.dtype} do not match")
    if out is None:
        out, acc = cp.empty((m, n), dtype=a.dtype), False
    if out.shape != (m, n) or out.dtype != a.dtype:
        raise ValueError(f"gemm: out is {out.shape} {out.dtype}, product is {(m, n)} {a.dtype}")
    if m == 0 or n == 0:
        return out
    if k == 0:
        if not acc:
            out.fill(0)
        return out
    dt = a.dtype
    compute = _COMPUTE_64F if dt == np.float64 else _COMPUTE_TF32 if tf32 else _COMPUTE_32F
    lib, handle = _lib(), device.get_cublas_handle()
    _check(lib.cublasSetStream_v2(handle, cp.cuda.get_current_stream().ptr), "cublasSetStream")
    # cuBLAS is column-major: the row-major m x n result is the column-major n x m matrix
    # C^T = op(b)^T op(a)^T, and a row-major operand read column-major is its transpose.
    # alpha and beta are host scalars (CuPy leaves its handle in host pointer mode).
    _check(lib.cublasGemmEx(handle, cublas.CUBLAS_OP_T if tb else cublas.CUBLAS_OP_N,
                            cublas.CUBLAS_OP_T if ta else cublas.CUBLAS_OP_N, n, m, k,
                            _ONE[dt].ctypes.data, b.data.ptr, _DATA[dt], _ld(b),
                            a.data.ptr, _DATA[dt], _ld(a),
                            (_ONE if acc else _ZERO)[dt].ctypes.data, out.data.ptr, _DATA[dt],
                            _ld(out), compute, cublas.CUBLAS_GEMM_DEFAULT), "cublasGemmEx")
    return out
