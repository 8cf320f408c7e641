"""Unit sources of GPU runs (agpt.train.sources): host batches prepared in worker processes
equal those prepared on a loader thread, and no shared memory outlives them."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from stores import make_trie

from agpt.errors import AgptError
from agpt.store.trie import open_trie
from agpt.train.batches import HostBatch, HostSpec, capacity
from agpt.train.objective import Weighting
from agpt.train.sources import ProcessSource, ShmPiece, ThreadSource
from agpt.train.units import unit_count
from agpt.train.workers import HostWorkers

SHM = Path("/dev/shm")


def _segments() -> set[str]:
    """Shared-memory segments (SharedMemory names them psm_*; the pools' semaphores differ)."""
    return {p.name for p in SHM.glob("psm_*")}


def _copy(hb: HostBatch) -> dict[str, object]:
    """Everything a batch holds (its tiles too), copied out of its (possibly shared) memory."""
    t = hb.targets
    rows = (t.rows.start, t.rows.stop) if isinstance(t.rows, slice) else t.rows.copy()
    tl = hb.tiles
    return {"tokens": hb.tokens.copy(), "parent": hb.parent.copy(), "depth": hb.depth.copy(),
            "rows": rows, "row": t.row.copy(), "token": t.token.copy(), "coef": t.coef.copy(),
            "row_coef": t.row_coef.copy(), "z": t.z, "max_depth": hb.max_depth,
            "fixed": hb.fixed, "tiles": None if tl is None else (tl.tile, tl.max_depth),
            **({} if tl is None else {"anc": tl.anc.copy(), "bidx": tl.bidx.copy(),
                                      "brow": tl.brow.copy()})}


def _device_copy(hb: HostBatch) -> dict[str, object]:
    return _copy(hb.for_device(np.float32))


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert a[k] == b[k], k


@pytest.fixture(scope="module")
def workers():
    """Two started workers: a cold fork server (Numba compiling its kernels, as on a fresh
    clone) can take a minute, during which a source prepares every unit on its loaders."""
    w = HostWorkers(2)
    w.wait()
    assert w.ready
    yield w
    w.close()


@pytest.mark.parametrize(("max_rows", "pad"), [(1 << 20, False), (40, False), (1 << 20, True)])
def test_process_source_equals_thread_source(tmp_path: Path, workers: HostWorkers,
                                             max_rows: int, pad: bool) -> None:
    rng = np.random.default_rng(max_rows + pad)
    text = "".join(rng.choice(list("abcdefg \n"), 2500))
    t = open_trie(make_trie(tmp_path, [text], 7, "unigram"))
    n = unit_count(t)
    rows = t.radix_rows()
    assert n > 6 and len(set(rows)) > 3
    pad_rows = capacity(int(rows.min()) + 1) if pad else 0       # the smallest units
    spec = HostSpec(t.vocab_size, Weighting("linear", 1.0), max_rows, t.max_depth, pad_rows)
    before = _segments()
    orders = [list(range(n)), [int(i) for i in rng.permutation(n)], [i for i in range(n) if i % 3]]
    kinds, shm = set(), 0
    for order in orders:
        thread, proc = ThreadSource(t, order, spec), ProcessSource(workers, t, order, spec,
                                                                   np.float32)
        with ThreadPoolExecutor(3) as ex:                     # loaders ask side by side
            got = list(ex.map(proc.host_unit, order))
        for i, hu in zip(order, got, strict=True):
            want = thread.host_unit(i)
            assert (hu.name, hu.n_rows, hu.padded) == (want.name, want.n_rows, want.padded)
            assert len(hu.pieces) == len(want.pieces)
            kinds.add(hu.padded)
            for p, q in zip(hu.pieces, want.pieces, strict=True):
                shm += isinstance(p, ShmPiece)
                # a worker's piece as it is (its tiles too); one a loader made, as it uploads
                got = p.upload(_copy if isinstance(p, ShmPiece) else _device_copy)
                _assert_same(got, q.upload(_device_copy))
        proc.close()
    assert kinds == ({False, True} if pad else {False})
    assert shm                                    # the workers prepared units, not only loaders
    assert max_rows > 1000 or any(len(thread.host_unit(i).pieces) > 1 for i in range(n))
    assert _segments() <= before                  # every segment was unlinked once uploaded


def test_closing_a_source_releases_what_was_never_uploaded(tmp_path: Path,
                                                           workers: HostWorkers) -> None:
    t = open_trie(make_trie(tmp_path, ["the cat sat on the mat, the hat sat on the cat\n"] * 9,
                            6, "bigram"))
    order = list(range(unit_count(t)))
    spec = HostSpec(t.vocab_size, Weighting(), 1 << 20, t.max_depth)
    before = _segments()
    src = ProcessSource(workers, t, order, spec, np.float32)
    hu = src.host_unit(order[0])                       # asked for (blocks ahead submitted), kept
    assert hu.pieces and _segments() - before
    src.close()
    assert _segments() <= before
    with pytest.raises(AgptError, match="closed"):
        src.host_unit(order[-1])


def test_a_worker_error_reaches_the_loader(tmp_path: Path, workers: HostWorkers) -> None:
    url = make_trie(tmp_path, ["abcabcabd\n" * 20], 5, "bigram")
    t = open_trie(url)
    order = list(range(unit_count(t)))
    spec = HostSpec(t.vocab_size, Weighting(), 1 << 20, t.max_depth)
    src = ProcessSource(workers, t, order, spec, np.float32)
    for f in Path(url).rglob("*"):                     # the partitions' rows are gone
        if f.is_file() and "radix" in f.parts and "zarr.json" not in f.name:
            os.remove(f)
    with pytest.raises(AgptError):
        src.host_unit(order[0])
    src.close()


def test_worker_count_falls_back_to_threads_or_says_why(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    import agpt.train.workers as workers
    monkeypatch.setattr(workers.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(workers, "shm_free", lambda: 8 << 30)
    assert workers.worker_count(0, str(tmp_path)) == 6
    assert workers.worker_count(3, str(tmp_path)) == 3
    assert workers.worker_count(-1, str(tmp_path)) == 0
    assert workers.worker_count(0, "memory://t") == 0
    with pytest.raises(AgptError, match="in-memory"):
        workers.worker_count(2, "memory://t")
    monkeypatch.setattr(workers.os, "cpu_count", lambda: 2)
    assert workers.worker_count(0, str(tmp_path)) == 0             # two cores: threads
    monkeypatch.undo()
    monkeypatch.setattr(workers, "SHM_DIR", str(tmp_path / "none"))    # no shared memory
    assert workers.shm_free() == 0
    assert workers.worker_count(0, str(tmp_path)) == 0
    with pytest.raises(AgptError, match="shared memory"):
        workers.worker_count(4, str(tmp_path))


def test_workers_that_cannot_start_are_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import agpt.train.workers as workers

    def broken() -> None:
        raise OSError("no fork server")
    monkeypatch.setattr(workers, "start_fork_server", broken)
    w = HostWorkers(1)
    w.wait()
    with pytest.raises(AgptError, match="did not start .no fork server.*--host-workers -1"):
        assert w.ready
    w.close()


class _Late:
    """Workers that are ready only once asked `after` times (once per block not submitted)."""

    def __init__(self, workers: HostWorkers, after: int):
        self.pool, self.n, self.after, self.asked = workers.pool, workers.n, after, 0

    @property
    def ready(self) -> bool:
        self.asked += 1
        return self.asked > self.after

    def when_ready(self, f) -> None:
        pass                                    # ready only as asked


class _Manual:
    """Workers that start when told to (`go`)."""

    def __init__(self, workers: HostWorkers):
        self.pool, self.n, self.ready, self.waiting = workers.pool, workers.n, False, []

    def when_ready(self, f) -> None:
        if self.ready:
            f()
        else:
            self.waiting.append(f)

    def go(self) -> None:
        self.ready = True
        for f in self.waiting:
            f()


def test_workers_that_start_are_handed_the_blocks_no_thread_took(
        tmp_path: Path, workers: HostWorkers) -> None:
    rng = np.random.default_rng(4)
    t = open_trie(make_trie(tmp_path, ["".join(rng.choice(list("abcdef \n"), 800))], 6, "bigram"))
    order = list(range(unit_count(t)))
    spec = HostSpec(t.vocab_size, Weighting(), 1 << 20, t.max_depth)
    before = _segments()
    late = _Manual(workers)
    proc = ProcessSource(late, t, order, spec, np.float32, 3 * int(np.median(t.radix_rows())))
    first = proc.host_unit(order[0])                    # no worker yet: on this thread
    assert type(first.pieces[0]).__name__ == "LazyPiece" and not proc._futures
    late.go()                                           # no unit asked since
    taken = proc._block_of[order[0]]
    assert min(proc._futures) == taken + 1
    thread = ThreadSource(t, order, spec)
    for p, q in zip(first.pieces, thread.host_unit(order[0]).pieces, strict=True):
        _assert_same(p.upload(_device_copy), q.upload(_device_copy))
    for i in order[1:]:
        hu = proc.host_unit(i)
        mine = proc._block_of[i] == taken
        assert type(hu.pieces[0]).__name__ == ("LazyPiece" if mine else "ShmPiece")
        for p, q in zip(hu.pieces, thread.host_unit(i).pieces, strict=True):
            _assert_same(p.upload(_device_copy), q.upload(_device_copy))
    proc.close()
    assert _segments() <= before


def test_units_asked_before_the_workers_start_are_prepared_on_the_thread(
        tmp_path: Path, workers: HostWorkers) -> None:
    rng = np.random.default_rng(3)
    t = open_trie(make_trie(tmp_path, ["".join(rng.choice(list("abcdef \n"), 800))], 6, "bigram"))
    order = list(range(unit_count(t)))
    spec = HostSpec(t.vocab_size, Weighting("log", 0.5), 1 << 20, t.max_depth)
    thread = ThreadSource(t, order, spec)
    before = _segments()
    block_rows = 3 * int(np.median(t.radix_rows()))                  # blocks of a few units
    proc = ProcessSource(_Late(workers, after=2), t, order, spec, np.float32, block_rows)
    kinds = []
    for i in order:
        hu = proc.host_unit(i)
        kinds.append(type(hu.pieces[0]).__name__)
        for p, q in zip(hu.pieces, thread.host_unit(i).pieces, strict=True):
            # for_device leaves a worker's batch (already converted) as it is
            _assert_same(p.upload(_device_copy), q.upload(_device_copy))
    proc.close()
    # the first units on the thread (whole blocks: a block is read once), the rest by workers
    assert kinds[0] == "LazyPiece" and kinds[-1] == "ShmPiece"
    assert kinds == sorted(kinds)
    assert _segments() <= before


def test_a_dead_worker_is_a_clear_error(tmp_path: Path) -> None:
    import signal
    t = open_trie(make_trie(tmp_path, ["abcabcabd\n" * 20], 5, "bigram"))
    order = list(range(unit_count(t)))
    spec = HostSpec(t.vocab_size, Weighting(), 1 << 20, t.max_depth)
    w = HostWorkers(1)
    try:
        w.wait()                                        # the worker is up
        for p in list(w.pool._processes.values()):
            os.kill(p.pid, signal.SIGKILL)              # as the out-of-memory killer would
        src = ProcessSource(w, t, order, spec, np.float32)
        with pytest.raises(AgptError, match="worker process died"):
            for i in order:
                src.host_unit(i)
        src.close()
    finally:
        w.close()


_KERNEL_TYPES = """
import json
import sys
import numpy as np
import agpt.train.preload                      # what the fork server imports
kept_out = sorted(m for m in ("cupy", "scipy") if m in sys.modules)
from agpt.gpu.tiles import _tile_pass
from agpt.store.trie import open_trie
from agpt.train.batches import HostSpec
from agpt.train.expand import expand_radix, loss_terms
from agpt.train.objective import Weighting
from agpt.train.sources import ThreadSource
from agpt.train.units import unit_count

kernels = (expand_radix, loss_terms, _tile_pass)
loaded = [set(k.signatures) for k in kernels]
for url in sys.argv[1:]:
    t = open_trie(url)
    order = list(range(unit_count(t)))
    src = ThreadSource(t, order, HostSpec(t.vocab_size, Weighting(), 1 << 20, t.max_depth))
    for i in order:
        for p in src.host_unit(i).pieces:
            p.upload(lambda hb: hb.for_device(np.float32))
blocked_after = []
for m in ("cupy", "scipy"):
    try:
        __import__(m)
    except ImportError as e:                   # absent is fine; blocked is not
        if "halted" in str(e):
            blocked_after.append(m)
print(json.dumps({"loaded": [len(s) for s in loaded], "kept_out": kept_out,
                  "new": [len(set(k.signatures) - s) for k, s in zip(kernels, loaded)],
                  "blocked_after": blocked_after}))
"""


def test_the_fork_servers_preload_loads_every_type_a_store_gives(tmp_path: Path) -> None:
    """After the fork server's preload (agpt.train.preload), a store's units (uint8 and uint16
    tokens, the spine unit among them) call no compiled host kernel with a type it did not
    load: what the server loaded is what its workers use. The preload kept SciPy and CuPy out
    and left them importable. In a fresh process: other tests load kernels too."""
    import json
    import subprocess
    import sys
    rng = np.random.default_rng(5)
    for d in "ab":
        (tmp_path / d).mkdir()
    small = make_trie(tmp_path / "a", ["abcabcabd\n" * 20], 5, "bigram")
    wide = "".join(chr(0x100 + int(i)) for i in rng.integers(0, 300, 3000))
    big = make_trie(tmp_path / "b", [wide], 4)
    assert open_trie(big).vocab_size > 256
    out = subprocess.run([sys.executable, "-c", _KERNEL_TYPES, small, big], check=True,
                         capture_output=True, text=True).stdout
    got = json.loads(out.split("\n")[-2])
    assert all(got["loaded"]) and got["new"] == [0, 0, 0]
    assert got["kept_out"] == [] and got["blocked_after"] == []
