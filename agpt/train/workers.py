"""The worker processes of a GPU run (agpt.train.sources prepares units in them): how many,
and starting them. Light on purpose (no NumPy, Zarr or Numba at import): `start_early` is
called first thing by a program that will train, so their fork server loads beside the
program's own imports."""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

from agpt.errors import AgptError

#: shared memory a run needs free for worker processes (else the loader threads prepare)
SHM_NEEDED = 1 << 30
SHM_DIR = "/dev/shm"


def shm_free() -> int:
    """Bytes free for shared memory (0 where there is no /dev/shm)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def worker_count(requested: int, url: str) -> int:
    """Worker processes for a GPU run on the store at `url`: `requested`, or with 0 half the
    cores, at most 6 (none below 4 cores, for an in-memory store another process cannot open,
    or with less than SHM_NEEDED of shared memory: the loader threads then prepare the units);
    -1: none."""
    if requested < 0:
        return 0
    if url.startswith("memory://"):
        if requested:
            raise AgptError("--host-workers: an in-memory store cannot be read by other "
                            "processes; use --host-workers -1")
        return 0
    if shm_free() < SHM_NEEDED:
        if requested:
            raise AgptError(f"--host-workers needs {SHM_NEEDED >> 20} MiB of shared memory; "
                            f"{SHM_DIR} has {shm_free() >> 20} MiB free (in Docker: "
                            "--shm-size); use --host-workers -1")
        return 0
    if requested:
        return requested
    n = min(6, (os.cpu_count() or 1) // 2)
    return n if n >= 2 else 0


def start_fork_server() -> None:
    """Start the fork server the workers come from, if not yet running. It imports NumPy,
    Zarr and Numba and loads the compiled host kernels (agpt.train.preload): ~2.1 s on the
    H100 machine (with SciPy and CuPy, since kept out), after which each worker forked from
    it starts in ~50 ms."""
    from multiprocessing import forkserver
    forkserver.set_forkserver_preload(["agpt.train.preload"])
    forkserver.ensure_running()


def start_early(device: str, host_workers: int, url: str) -> None:
    """Start the fork server now if a run on `device` with `--host-workers host_workers` on
    the store at `url` may use workers (a GPU run: known without importing CuPy). Errors are
    left to the run, which reports them where it decides."""
    if device not in ("cuda", "auto") or importlib.util.find_spec("cupy") is None:
        return
    try:
        n = worker_count(host_workers, url)
    except AgptError:
        return
    if n:
        start_fork_server()


class HostWorkers:
    """A run's worker processes. They come from a fork server (start_fork_server), never a
    fork of the trainer: the trainer holds a CUDA context and threads, which a fork must not
    copy. A background thread starts them all, since starting a process waits until the
    server has loaded (the trainer's main thread, set up meanwhile, had waited up to 1.3 s for
    it). Each worker opens the store at `url`. Workers ignore Ctrl-C: the trainer handles it
    and stops them."""

    def __init__(self, n: int, url: str | None = None):
        from agpt.train.sources import init_worker
        self.n = n
        self.pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("forkserver"),
                                        initializer=init_worker, initargs=(url,))
        self._started: list[Future] = []     # one task per worker: done once it has started
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._waiting: list[Callable[[], None]] | None = []    # None: announced
        #: time.perf_counter() when the first worker had started (None: not yet)
        self.ready_at: float | None = None
        self._starter = threading.Thread(target=self._start, name="agpt-workers", daemon=True)
        self._starter.start()

    def _start(self) -> None:
        try:
            start_fork_server()
            self._started = [self.pool.submit(int) for _ in range(self.n)]
            wait(self._started, return_when=FIRST_COMPLETED)
        except BaseException as e:  # noqa: BLE001 - reported by `ready`
            self._error = e
            return
        self.ready_at = time.perf_counter()
        with self._lock:
            waiting, self._waiting = self._waiting, None
        for f in waiting or ():
            f()

    def when_ready(self, f: Callable[[], None]) -> None:
        """Call f once a worker has started (on the starting thread), or now if one has."""
        with self._lock:
            if self._waiting is not None:
                self._waiting.append(f)
                return
        f()

    @property
    def ready(self) -> bool:
        """Whether a worker has started; AgptError if they could not be started."""
        if self._error is not None:
            raise AgptError(f"the host worker processes did not start ({self._error}); "
                            "--host-workers -1 prepares partitions on the loader threads")
        return self.ready_at is not None

    def wait(self) -> None:
        """Until every worker has started (or failed to)."""
        self._starter.join()
        for f in self._started:
            f.exception()

    def close(self) -> None:
        self._starter.join()
        self.pool.shutdown(wait=True, cancel_futures=True)
