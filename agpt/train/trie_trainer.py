"""`agpt train`: exact aggregated-gradient training on a trie store (SPEC §8).

An epoch visits the units (every partition with its spine prefix as context, then the spine
itself when it has nodes below the root), reading the next one on a background thread while
the current one is computed. A unit larger than the memory budget is cut into chunks
(units.chunks) whose gradients sum to the unit's, so the budget never changes the math.
One update per unit (`step="partition"`, the seed's recipe) or per epoch (`step="epoch"`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from agpt.errors import AgptError
from agpt.model.config import ModelConfig
from agpt.model.gpt import loss_and_grad
from agpt.store.trie import TrieStore
from agpt.train.batches import unit_batch
from agpt.train.objective import Weighting
from agpt.train.session import Session
from agpt.train.units import Unit, chunks, partition_unit, spine_unit


@dataclass(frozen=True)
class TrieArgs:
    epochs: int = 1
    step: str = "partition"          # partition | epoch
    gradient: str = "exact"          # exact | truncated
    mass_weight: str = "linear"
    entropy_lambda: float = 0.0
    memory_budget: int = 2 << 30     # bytes of activations per chunk
    shuffle: bool = False            # visit partitions in a seeded random order each epoch
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise AgptError("--epochs must be >= 1")
        if self.step not in ("partition", "epoch"):
            raise AgptError(f"unknown --step {self.step!r}: use partition or epoch")
        if self.gradient not in ("exact", "truncated"):
            raise AgptError(f"unknown --gradient {self.gradient!r}: use exact or truncated")
        Weighting(self.mass_weight, self.entropy_lambda)

    @property
    def weighting(self) -> Weighting:
        return Weighting(self.mass_weight, self.entropy_lambda)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bytes_per_row(cfg: ModelConfig, depth: int, itemsize: int) -> int:
    """Peak activation bytes per row of the reference backend (saved activations per layer,
    the gathered ancestor K/V and their gradient contributions, logits)."""
    d, f, h = cfg.d_model, cfg.d_ff, cfg.n_heads
    per_layer = 9 * d + 2 * f + h * depth + 2
    transient = 6 * depth * d + 3 * h * depth
    return itemsize * (cfg.n_layers * per_layer + transient + 3 * cfg.vocab_size + 4 * d) + 64


def rows_for_budget(cfg: ModelConfig, depth: int, itemsize: int, budget: int) -> int:
    rows = budget // bytes_per_row(cfg, depth, itemsize)
    if rows < depth + 1:
        need = (depth + 1) * bytes_per_row(cfg, depth, itemsize)
        raise AgptError(f"--memory-budget {budget} bytes cannot hold one context of depth {depth} "
                        f"(needs {need / 2**20:.1f} MiB); raise it")
    return int(rows)


def unit_count(store: TrieStore) -> int:
    return store.n_partitions + (1 if len(store.spine().depth) > 1 else 0)


def load_unit(store: TrieStore, i: int) -> Unit:
    if i < store.n_partitions:
        return partition_unit(store, i)
    u = spine_unit(store.spine())
    assert u is not None
    return u


def prefetch(store: TrieStore, order: list[int], depth: int = 2) -> Iterator[tuple[int, Unit]]:
    """Units in `order`, each read and expanded on a background thread ahead of use."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for i in order:
                if stop.is_set():
                    return
                t = time.perf_counter()
                q.put((i, load_unit(store, i), time.perf_counter() - t))
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)
        q.put(None)

    th = threading.Thread(target=work, daemon=True)
    th.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def epoch_order(args: TrieArgs, n_units: int, epoch: int) -> list[int]:
    if not args.shuffle:
        return list(range(n_units))
    return [int(i) for i in np.random.default_rng([args.seed, epoch]).permutation(n_units)]


def train_epochs(s: Session, store: TrieStore, args: TrieArgs,
                 until_epoch: int | None = None) -> None:
    """Run epochs from the session's position up to args.epochs (or until_epoch)."""
    cfg, be = s.cfg, s.be
    V = store.vocab_size
    n_units = unit_count(store)
    max_rows = min(rows_for_budget(cfg, store.max_depth, be.dtype.itemsize, args.memory_budget),
                   max(be.chunk_rows, 2 * store.max_depth))
    truncated = args.gradient == "truncated"
    last = min(args.epochs, until_epoch or args.epochs)
    while s.pos.epoch < last:
        e = s.pos.epoch
        order = epoch_order(args, n_units, e)
        if args.step == "epoch":
            s.pos.unit = 0            # a partial epoch's accumulation is never saved
            s.grad[...] = 0
        ep_loss = ep_z = 0.0
        ep_rows = 0
        t_ep = time.perf_counter()
        io_wait = 0.0
        z_acc = loss_acc = 0.0
        t_wait = time.perf_counter()
        for k, (i, unit, _read_s) in enumerate(prefetch(store, order[s.pos.unit:]), s.pos.unit):
            io_wait += time.perf_counter() - t_wait
            t_u = time.perf_counter()
            loss_sum = z = 0.0
            for c in chunks(unit, max_rows):
                batch, zc = unit_batch(be, c, V, args.weighting)
                loss_sum += loss_and_grad(cfg, be, s.params, batch, s.grad, truncated)
                z += zc
            ep_loss += loss_sum
            ep_z += z
            ep_rows += unit.n_rows
            where = f"epoch {e + 1} unit {k + 1}/{n_units} ({unit.name})"
            if args.step == "partition":
                if z == 0:
                    s.grad[...] = 0
                else:
                    be.synchronize()
                    dt = time.perf_counter() - t_u
                    info = s.update(z, loss_sum, where)
                    s.log("step", unit=i, rows=unit.n_rows, rows_per_s=round(unit.n_rows / dt, 1),
                          **info)
            else:
                z_acc += z
                loss_acc += loss_sum
                s.check_finite(loss_sum, where)
            if args.step == "partition":
                s.pos.unit = k + 1    # resumable here; an epoch-step run restarts its epoch
            rate = ep_rows / max(1e-9, time.perf_counter() - t_ep)
            s.show(f"epoch {e + 1}/{args.epochs} unit {k + 1}/{n_units} "
                   f"loss {ep_loss / max(ep_z, 1e-12):.4f} lr {s.lr():.3g} rows/s {rate:,.0f}")
            t_wait = time.perf_counter()
        if args.step == "epoch" and z_acc > 0:
            info = s.update(z_acc, loss_acc, f"epoch {e + 1}")
            s.log("step", rows=ep_rows, **info)
        secs = time.perf_counter() - t_ep
        s.pos.epoch, s.pos.unit = e + 1, 0
        s.log("epoch", loss=ep_loss / max(ep_z, 1e-12), rows=ep_rows, seconds=round(secs, 3),
              rows_per_s=round(ep_rows / max(secs, 1e-9), 1), io_wait_s=round(io_wait, 3),
              lr=s.lr())
        s.show(f"epoch {e + 1}/{args.epochs} loss {ep_loss / max(ep_z, 1e-12):.4f} "
               f"{ep_rows:,} rows in {secs:.1f} s ({ep_rows / max(secs, 1e-9):,.0f} rows/s)",
               final=True)
        s.save()
