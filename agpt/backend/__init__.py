"""Array backends: the one interface through which the trainer touches arrays.

`reference.NumpyBackend` is the plain NumPy implementation of every operation the model
needs; it runs in CI and is the oracle each GPU kernel (agpt/gpu/) is tested against.
"""

from __future__ import annotations

from typing import Any

from agpt.backend.reference import NumpyBackend
from agpt.errors import AgptError

__all__ = ["NumpyBackend", "get_backend"]


def get_backend(device: str = "cpu", dtype: Any = "float32", tf32: bool = False) -> NumpyBackend:
    """`cpu` (NumPy), `cuda` (CuPy; an error when there is no usable GPU) or `auto`.
    tf32: float32 matmuls on TF32 tensor cores (GPU only)."""
    if device in ("cpu", "numpy"):
        return NumpyBackend(dtype)
    if device in ("cuda", "auto"):
        try:
            from agpt.gpu.backend import CupyBackend, gpu_available
        except ImportError:
            CupyBackend = None  # noqa: N806
        if CupyBackend is not None and gpu_available():
            return CupyBackend(dtype, tf32)
        if device == "cuda":
            raise AgptError("--device cuda: no usable GPU (CuPy missing or no CUDA device); "
                            "use --device cpu")
        return NumpyBackend(dtype)
    raise AgptError(f"unknown device {device!r}: use cpu, cuda or auto")
