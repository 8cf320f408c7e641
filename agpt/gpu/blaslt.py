"""Row-major matrix products on cuBLASLt with fused epilogues.

A thin product (K = d_model = 64) followed by a bias add, a bias + ReLU, a ReLU backward or a
bias-gradient row sum spends as long in that second, bandwidth-bound pass over the (N, n)
result as in the product itself. cuBLASLt applies them in the product's epilogue while the
tile is still in registers:

| epilogue        | computes (row-major)                                                  |
| --------------- | --------------------------------------------------------------------- |
| `none`          | out (+)= op(a) @ op(b)                                                |
| `bias`          | out (+)= op(a) @ op(b) + bias                                         |
| `relu_aux_bias` | out = relu(op(a) @ op(b) + bias); aux = its mask, one bit per element  |
| `drelu_bgrad`   | out = (op(a) @ op(b)) * mask(aux); bias := out.sum(0)                  |
| `bgrada`        | out (+)= a.T @ b; bias := b.sum(0) (the weight and bias gradients)     |

The bias outputs (`:=`) are written, never accumulated: callers add them where they belong.
Reference semantics: `NumpyBackend.linear`, `.linear_relu`, `.relu_linear_backward`,
`.linear_grad` (agpt/backend/reference.py). Plans (descriptors and the chosen algorithm) are
cached per shape, strides, alignment and epilogue; `plan()` returns None where cuBLASLt has no
algorithm for a combination, and the backend then runs the unfused sequence.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from typing import Any

import cupy as cp
import numpy as np

from agpt.gpu.blas import _COMPUTE_32F, _COMPUTE_64F, _COMPUTE_TF32, _DATA, _ONE, _ZERO, _ld
from agpt.gpu.blas import loaded_library

EPILOGUES = {"none": 1, "bias": 4, "relu_aux_bias": 134, "drelu_bgrad": 152, "bgrada": 256}
_TRANSA, _TRANSB, _EPILOGUE, _BIAS_POINTER, _AUX_POINTER, _AUX_LD = 3, 4, 7, 8, 11, 12
_PREF_WORKSPACE = 1
_PREF_ALIGN = (5, 6, 7, 8)            # minimum alignment of A, B, C, D in bytes
WORKSPACE_BYTES = 32 << 20
#: heuristic candidates timed once per plan when autotuning (large products only)
CANDIDATES = 8
#: products at least this large (m * n * k) are autotuned: each plan's candidates are timed once
AUTOTUNE_FLOPS = 1 << 30


class _Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", _Algo), ("workspace", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


@functools.cache
def _lib() -> ctypes.CDLL:
    lib = loaded_library("libcublasLt.so")
    vp, i, p = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER
    lib.cublasLtCreate.argtypes = [p(vp)]
    lib.cublasLtMatmulDescCreate.argtypes = [p(vp), i, i]
    lib.cublasLtMatmulDescSetAttribute.argtypes = [vp, i, vp, ctypes.c_size_t]
    lib.cublasLtMatrixLayoutCreate.argtypes = [p(vp), i, ctypes.c_uint64, ctypes.c_uint64,
                                               ctypes.c_int64]
    lib.cublasLtMatmulPreferenceCreate.argtypes = [p(vp)]
    lib.cublasLtMatmulPreferenceSetAttribute.argtypes = [vp, i, vp, ctypes.c_size_t]
    lib.cublasLtMatmulPreferenceDestroy.argtypes = [vp]
    lib.cublasLtMatmulAlgoGetHeuristic.argtypes = [vp, vp, vp, vp, vp, vp, vp, i,
                                                   p(_Heuristic), p(i)]
    lib.cublasLtMatmul.argtypes = [vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp,
                                   p(_Algo), vp, ctypes.c_size_t, vp]
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed with cuBLAS status {status}")


def _set(setter: Any, obj: Any, attr: int, value: Any) -> None:
    _check(setter(obj, attr, ctypes.byref(value), ctypes.sizeof(value)), "cuBLASLt set attribute")


def _align(ptr: int) -> int:
    """The largest power of two up to 256 that divides ptr (the heuristic assumes 256)."""
    a = 256
    while ptr % a:
        a //= 2
    return a


@dataclass
class Plan:
    desc: Any
    layouts: tuple[Any, Any, Any]      # A (= b), B (= a), C = D (= out), cuBLAS's column-major
    algo: _Algo
    workspace: int


class _State:
    """One cuBLASLt handle, its workspace and the plan cache (the trainer's thread only)."""

    def __init__(self) -> None:
        self.handle = ctypes.c_void_p()
        _check(_lib().cublasLtCreate(ctypes.byref(self.handle)), "cublasLtCreate")
        self.workspace = cp.empty(WORKSPACE_BYTES, dtype=np.uint8)
        self.plans: dict[tuple, Plan | None] = {}


@functools.cache
def _state() -> _State:
    return _State()


def _shape(a: Any, b: Any, ta: bool, tb: bool) -> tuple[int, int, int]:
    m, k = (a.shape[1], a.shape[0]) if ta else a.shape
    kb, n = (b.shape[1], b.shape[0]) if tb else b.shape
    if k != kb or a.dtype != b.dtype:
        raise ValueError(f"matmul: shapes {a.shape}{'ᵀ' if ta else ''} @ {b.shape}"
                         f"{'ᵀ' if tb else ''} or dtypes {a.dtype}, {b.dtype} do not match")
    return m, n, k


def plan(a: Any, b: Any, out: Any, ta: bool, tb: bool, epilogue: str, tf32: bool,
         aux_ld: int = 0) -> Plan | None:
    """The cached plan for this product, or None if cuBLASLt has no algorithm for it."""
    m, n, k = _shape(a, b, ta, tb)
    dt = np.dtype(a.dtype)
    aligns = tuple(_align(x.data.ptr) for x in (b, a, out, out))
    key = (dt, tf32, ta, tb, m, n, k, _ld(a), _ld(b), _ld(out), epilogue, aux_ld, aligns)
    st = _state()
    if key in st.plans:
        return st.plans[key]
    lib, vp = _lib(), ctypes.c_void_p
    compute = _COMPUTE_64F if dt == np.float64 else _COMPUTE_TF32 if tf32 else _COMPUTE_32F
    desc = vp()
    _check(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), compute, _DATA[dt]), "desc create")
    setd = lib.cublasLtMatmulDescSetAttribute
    # row-major C = op(a) op(b) is column-major C^T = op(b)^T op(a)^T (see blas.gemm)
    _set(setd, desc, _TRANSA, ctypes.c_int(1 if tb else 0))
    _set(setd, desc, _TRANSB, ctypes.c_int(1 if ta else 0))
    _set(setd, desc, _EPILOGUE, ctypes.c_uint32(EPILOGUES[epilogue]))
    if aux_ld:
        _set(setd, desc, _AUX_LD, ctypes.c_int64(aux_ld))
        # the heuristic reads the aux pointer's alignment: any 256-byte aligned stand-in
        _set(setd, desc, _AUX_POINTER, ctypes.c_void_p(st.workspace.data.ptr))
    layouts = []
    for x in (b, a, out):
        lay = vp()
        _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(lay), _DATA[dt], x.shape[1],
                                              x.shape[0], _ld(x)), "layout create")
        layouts.append(lay)
    pref = vp()
    _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference create")
    setp = lib.cublasLtMatmulPreferenceSetAttribute
    _set(setp, pref, _PREF_WORKSPACE, ctypes.c_uint64(WORKSPACE_BYTES))
    for attr, al in zip(_PREF_ALIGN, aligns):
        _set(setp, pref, attr, ctypes.c_uint32(al))
    found = (_Heuristic * CANDIDATES)()
    count = ctypes.c_int(0)
    status = lib.cublasLtMatmulAlgoGetHeuristic(st.handle, desc, layouts[0], layouts[1],
                                                layouts[2], layouts[2], pref, CANDIDATES,
                                                found, ctypes.byref(count))
    lib.cublasLtMatmulPreferenceDestroy(pref)
    cands = [found[i] for i in range(count.value) if found[i].state == 0] if status == 0 else []
    if not cands:
        st.plans[key] = None
        return None
    best = cands[0]
    st.plans[key] = Plan(desc, tuple(layouts), best.algo, best.workspace)
    return st.plans[key]


def candidates(a: Any, b: Any, out: Any, ta: bool, tb: bool, epilogue: str, tf32: bool,
               aux_ld: int = 0) -> list[Plan]:
    """Every algorithm the heuristic offers for this product, best guess first (for tuning)."""
    p = plan(a, b, out, ta, tb, epilogue, tf32, aux_ld)
    if p is None:
        return []
    lib, st = _lib(), _state()
    pref = ctypes.c_void_p()
    _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference create")
    _set(lib.cublasLtMatmulPreferenceSetAttribute, pref, _PREF_WORKSPACE,
         ctypes.c_uint64(WORKSPACE_BYTES))
    for attr, x in zip(_PREF_ALIGN, (b, a, out, out)):
        _set(lib.cublasLtMatmulPreferenceSetAttribute, pref, attr,
             ctypes.c_uint32(_align(x.data.ptr)))
    found = (_Heuristic * CANDIDATES)()
    count = ctypes.c_int(0)
    lib.cublasLtMatmulAlgoGetHeuristic(st.handle, p.desc, *p.layouts, p.layouts[2], pref,
                                       CANDIDATES, found, ctypes.byref(count))
    lib.cublasLtMatmulPreferenceDestroy(pref)
    return [Plan(p.desc, p.layouts, found[i].algo, found[i].workspace)
            for i in range(count.value) if found[i].state == 0]


def run(p: Plan, a: Any, b: Any, out: Any, acc: bool = False, bias: Any = None,
        aux: Any = None) -> Any:
    """Launch a plan on the current stream (capturable: no allocation, no synchronisation)."""
    lib, st = _lib(), _state()
    setd = lib.cublasLtMatmulDescSetAttribute
    if bias is not None:
        _set(setd, p.desc, _BIAS_POINTER, ctypes.c_void_p(bias.data.ptr))
    if aux is not None:
        _set(setd, p.desc, _AUX_POINTER, ctypes.c_void_p(aux.data.ptr))
    dt = np.dtype(a.dtype)
    _check(lib.cublasLtMatmul(st.handle, p.desc, _ONE[dt].ctypes.data, b.data.ptr, p.layouts[0],
                              a.data.ptr, p.layouts[1], (_ONE if acc else _ZERO)[dt].ctypes.data,
                              out.data.ptr, p.layouts[2], out.data.ptr, p.layouts[2],
                              ctypes.byref(p.algo), st.workspace.data.ptr, p.workspace,
                              cp.cuda.get_current_stream().ptr), "cublasLtMatmul")
    return out
