"""Imported by the host workers' fork server (agpt.train.workers.start_fork_server): it
imports what the workers run and loads the compiled host kernels there, once, so every worker
forked from the server starts with them loaded (each loading them itself took ~1 s on the H100
machine, after the server's own start).

Two imports the workers never use are kept out while it loads: Zarr probes for CuPy (for its
GPU buffers: 0.19 s on the H100 machine) and Numba for SciPy (a BLAS for np.dot, which our
kernels never call). They delayed the server, and with it epoch 1's first units. They are
blocked only while this module loads, since the server forks other code's workers too; what
stays is that the server's Zarr has no GPU buffers and Numba's np.correlate/np.convolve
no BLAS (np.dot and np.linalg load it when compiled)."""

import sys

_KEPT_OUT = [m for m in ("cupy", "scipy") if m not in sys.modules]


def _let_in() -> None:
    for m in _KEPT_OUT:
        if sys.modules.get(m, 0) is None:
            del sys.modules[m]


for _m in _KEPT_OUT:
    sys.modules[_m] = None      # an import of it fails at once (ImportError), as if absent
try:
    from agpt.train.sources import load_host_kernels
except ImportError:             # something on the way needs one of them after all
    _let_in()
    from agpt.train.sources import load_host_kernels
try:
    load_host_kernels()
finally:
    _let_in()
