"""What both trainers share: parameters on the device, the optimizer, the schedule,
checkpoints, metrics, progress, NaN/Inf detection and Ctrl-C handling.

A session advances in *updates*. Position (epoch, unit) and update count are saved with the
weights and optimizer slots, so `--resume` continues exactly where a run stopped (bit for bit
on the CPU: every unit's computation depends only on the saved state).
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from agpt.errors import AgptError
from agpt.model.config import ModelConfig
from agpt.store.checkpoint import Checkpoint, save_checkpoint
from agpt.train.optim import OptimConfig, Optimizer, lr_at

#: reference steps per epoch of auto-LR (the seed: 65 root-child partitions of tinyshakespeare)
AUTO_LR_REFERENCE = 65
#: on the GPU, an update's NaN/Inf check and step record wait until the device has done it
#: (checked without waiting), or until this many later updates are queued: the host runs ahead
#: of the device through long units, and a run of small units (each shorter on the device than
#: the host's turn around it) then drains that lead instead of idling the device
SETTLE_LAG = 64


class Interrupted(AgptError):
    """Ctrl-C during training: the state after the last update was saved."""

    exit_code = 130


class TrainingDiverged(AgptError):
    """Loss or gradient became NaN/Inf; the message names the last good checkpoint."""

    exit_code = 3


@dataclass
class Position:
    epoch: int = 0      # current epoch, 0-based
    unit: int = 0       # next unit of that epoch
    update: int = 0     # optimizer updates done

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "unit": self.unit, "update": self.update}


@dataclass
class Session:
    cfg: ModelConfig
    be: Any
    ck: Checkpoint                      # the state being trained (params are copied to device)
    out: str                            # checkpoint URL written by this run
    optim: OptimConfig
    total_updates: int
    base_lr: float
    metrics_path: str | None = None
    progress: bool = True
    pos: Position = field(default_factory=Position)
    last_good: str = ""

    def __post_init__(self) -> None:
        xp = self.be.xp
        self.params = self.be.asarray(self.ck.params, self.be.dtype).copy()
        self.grad = xp.zeros_like(self.params)
        self.opt = Optimizer(self.optim, xp, self.params,
                             {k: self.be.asarray(v, self.be.dtype) for k, v in self.ck.opt_state.items()},
                             int(self.ck.state.get("optimizer_t", 0)),
                             getattr(self.be, "optimizer_update", None))
        p = self.ck.state.get("position")
        if p:
            self.pos = Position(**p)
        self._metrics = open(self.metrics_path, "a") if self.metrics_path else None  # noqa: SIM115
        self._t0 = self._t_settled = time.perf_counter()
        self._last_print = 0.0
        self._pending: collections.deque = collections.deque()
        #: updates between one's queuing and its check (GPU: a small unit's work is shorter
        #: than the host's turn around one update, so one update of slack idles the device)
        self.check_lag = SETTLE_LAG if getattr(self.be, "stage_in_background", False) else 0
        self.proc = psutil.Process()

    # -- updates -------------------------------------------------------------------------
    def lr(self) -> float:
        return lr_at(self.optim, self.pos.update, self.total_updates, self.base_lr)

    def check_finite(self, loss_sum: Any, where: str, ok: Any = None) -> None:
        if ok is None:
            ok = self.be.xp.isfinite(loss_sum) & self.be.xp.isfinite(self.grad).all()
        if not bool(ok):
            raise TrainingDiverged(
                f"loss or gradient became NaN/Inf at {where} (update {self.pos.update + 1}); "
                f"stopped: nothing after it is saved. Last good checkpoint: "
                f"{self.last_good or 'none'} (lower --lr or enable --clip, then --resume from it)")

    def update(self, z: float, loss_sum: Any, where: str, **log: Any) -> None:
        """Normalise the accumulated gradient by z, clip, step; zero the gradient.

        The loss and the norm stay on the device: on the GPU the finiteness check of this
        update and its "step" record are settled once the device has done it, at the latest
        SETTLE_LAG updates later (and before anything is saved), so the host queues the next
        units while this one still runs. A NaN/Inf is still caught before any checkpoint
        holds it, and named by its own update."""
        lr = self.lr()
        stats = self.opt.update(self.params, self.grad, z, self.be.xp.asarray(loss_sum), lr)
        host, done = self.be.fetch(stats)           # no wait: read once `done` has happened
        self._pending.append((done, host, z, lr, where, self.pos.update, self.pos.epoch, log))
        self.pos.update += 1
        while self._pending and (len(self._pending) > self.check_lag
                                 or self._pending[0][0] is None or self._pending[0][0].done):
            self._settle_one()

    def rehearse_update(self, grad: Any, loss_sum: Any) -> None:
        """An update's kernels on copies of the state (loads them: see
        trie_trainer.warm_up_device); the session's state is unchanged, `grad` is zeroed."""
        opt = Optimizer(self.optim, self.be.xp, self.params,
                        {k: v.copy() for k, v in self.opt.slots.items()}, self.opt.t,
                        self.opt.fused)
        opt.update(self.params.copy(), grad, 1.0, self.be.xp.asarray(loss_sum), self.lr())
        self.be.synchronize()

    def settle(self) -> None:
        """Check and log every pending update (waits for the device to have computed them)."""
        while self._pending:
            self._settle_one()

    def _settle_one(self) -> None:
        done, stats, z, lr, where, update, epoch, log = self._pending.popleft()
        if done is not None:
            done.synchronize()          # this update's stats only, not the work queued since
        ok, norm, loss_sum = stats.tolist()
        if not ok:
            self._pending.clear()
            self.pos.update = update
            self.check_finite(loss_sum, where, False)
        now = time.perf_counter()
        for key in ("rows", "positions"):      # throughput over the wall time since the last
            if key in log:                     # settled update
                log[f"{key}_per_s"] = round(log[key] / max(now - self._t_settled, 1e-9), 1)
        self._t_settled = now
        self.log("step", step=update + 1, epoch=epoch, lr=lr, grad_norm=norm, loss=loss_sum / z,
                 **log)

    # -- checkpoints -----------------------------------------------------------------------
    def save(self, extra: dict[str, Any] | None = None) -> None:
        self.settle()
        self.be.synchronize()
        state = dict(self.ck.state)
        state.update(extra or {})
        state["position"] = self.pos.to_dict()
        state["optimizer_t"] = self.opt.t
        ck = Checkpoint(self.cfg, self.be.to_host(self.params).copy(),
                        {k: self.be.to_host(v).copy() for k, v in self.opt.slots.items()},
                        self.ck.tokenizer, state)
        save_checkpoint(self.out, ck)
        self.ck = ck
        self.last_good = self.out

    # -- metrics and progress ----------------------------------------------------------------
    def log(self, event: str, **fields: Any) -> None:
        rec = {"event": event, "step": self.pos.update, "epoch": self.pos.epoch,
               "time_s": round(time.perf_counter() - self._t0, 4),
               "rss_mb": round(self.proc.memory_info().rss / 2**20, 1), **fields}
        if self._metrics is not None:
            self._metrics.write(json.dumps(rec) + "\n")
            self._metrics.flush()

    def show(self, text: str, final: bool = False) -> None:
        if not self.progress or (not final and not sys.stderr.isatty()):
            return              # in logs and pipes: one line per epoch, no carriage returns
        now = time.perf_counter()
        if final or now - self._last_print > 0.5:
            if sys.stderr.isatty():
                print(f"\r{text[:150]:<150}", end="\n" if final else "", file=sys.stderr,
                      flush=True)
            else:
                print(text, file=sys.stderr, flush=True)
            self._last_print = now

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None


def auto_lr(lr: float, steps_per_epoch: int) -> float:
    """The seed's auto-LR: lr x 65 / steps per epoch."""
    return lr * AUTO_LR_REFERENCE / max(1, steps_per_epoch)


def default_metrics_path(out: str) -> str | None:
    if "://" in out:
        return None
    return os.path.abspath(out.rstrip("/")) + ".metrics.jsonl"

