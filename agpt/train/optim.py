"""Optimizers and learning-rate schedules over one flat parameter vector (any backend).

sgd, momentum, adam (L2 weight decay added to the gradient), adamw (decoupled weight decay),
rmsprop (the seed's: no bias correction, `bias_correction=True` for the textbook one).
Weight decay is decoupled (θ -= lr·wd·θ) for every optimizer except adam. Global-norm
clipping happens before the update. Each update is a few whole-vector operations; the CuPy
backend runs the same code on device arrays.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from agpt.errors import AgptError

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "cosine", "warmup-cosine")
SLOTS = {"sgd": (), "momentum": ("m",), "adam": ("m", "v"), "adamw": ("m", "v"), "rmsprop": ("v",)}


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3
    beta1: float = 0.9          # adam/adamw first moment; momentum coefficient
    beta2: float = 0.999        # adam/adamw second moment; rmsprop decay
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip: float = 0.0           # global gradient norm; 0 = off
    bias_correction: bool = False   # rmsprop only (adam/adamw always correct)
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise AgptError(f"unknown optimizer {self.name!r}: use {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise AgptError(f"unknown schedule {self.schedule!r}: use {', '.join(SCHEDULES)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise AgptError(f"--lr must be a positive number, got {self.lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise AgptError("--beta1/--beta2 must be in [0, 1)")
        if self.clip < 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise AgptError("--clip, --weight-decay and warmup must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_at(cfg: OptimConfig, step: int, total_steps: int, base_lr: float | None = None) -> float:
    """Learning rate of update number `step` (0-based) out of total_steps."""
    lr = cfg.lr if base_lr is None else base_lr
    if cfg.schedule == "constant":
        return lr
    warm = cfg.warmup_steps if cfg.schedule == "warmup-cosine" else 0
    if step < warm:
        return lr * (step + 1) / warm
    span = max(1, total_steps - warm)
    frac = min(1.0, (step - warm) / span)
    return cfg.min_lr + (lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


class Optimizer:
    """State (slots + step count) and the update rule; slots are flat arrays like the params."""

    def __init__(self, cfg: OptimConfig, xp: Any, params: Any, slots: dict[str, Any] | None = None,
                 t: int = 0, fused: Any = None):
        """`fused`: a backend's whole update in a few kernels (CupyBackend.optimizer_update),
        the same rule as `update` below, which stays the reference."""
        self.cfg, self.xp, self.t, self.fused = cfg, xp, t, fused
        self.slots = {k: (xp.asarray(slots[k]) if slots and k in slots else xp.zeros_like(params))
                      for k in SLOTS[cfg.name]}

    def update(self, params: Any, grad: Any, z: float, loss_sum: Any, lr: float) -> Any:
        """One update from an accumulated gradient: grad / z, clipped, one step, grad zeroed.
        Returns its stats, a float64 array [finite flag (1 or 0), norm of grad / z before
        clipping, loss_sum] (on the GPU it stays on the device: no sync; the host reads it in
        one transfer). The flag is 0 when the loss or any gradient element is NaN/Inf: the
        norm is finite iff every element is (a squared norm that overflows counts too)."""
        if self.fused is not None:
            self.t += 1
            return self.fused(self.cfg, params, grad, self.slots, lr, self.t, z, loss_sum)
        xp = self.xp
        grad /= z
        norm = self.clip(grad)
        loss_sum = xp.asarray(loss_sum)
        ok = xp.isfinite(loss_sum) & xp.isfinite(norm)
        self.step(params, grad, lr)
        grad[...] = 0
        return xp.stack([ok, norm, loss_sum]).astype(xp.float64)

    def clip(self, grad: Any) -> Any:
        """Scale grad in place to the clip norm; returns the norm before clipping, as a 0-d
        array (on the GPU it stays on the device: no sync)."""
        xp = self.xp
        norm = xp.sqrt((grad * grad).sum())
        if self.cfg.clip > 0:
            grad *= xp.minimum(1.0, self.cfg.clip / (norm + 1e-12)).astype(grad.dtype)
        return norm

    def step(self, params: Any, grad: Any, lr: float) -> None:
        """The rule alone, on a gradient already normalised and clipped (generic array code)."""
        c, xp = self.cfg, self.xp
        self.t += 1
        if c.weight_decay and c.name != "adam":
            params -= lr * c.weight_decay * params
        if c.name == "sgd":
            params -= lr * grad
        elif c.name == "momentum":
            m = self.slots["m"]
            m *= c.beta1
            m += grad
            params -= lr * m
        elif c.name in ("adam", "adamw"):
            if c.name == "adam" and c.weight_decay:
                grad = grad + c.weight_decay * params
            m, v = self.slots["m"], self.slots["v"]
            m *= c.beta1
            m += (1 - c.beta1) * grad
            v *= c.beta2
            v += (1 - c.beta2) * grad * grad
            mh = m / (1 - c.beta1 ** self.t)
            vh = v / (1 - c.beta2 ** self.t)
            params -= lr * mh / (xp.sqrt(vh) + c.eps)
        else:  # rmsprop
            v = self.slots["v"]
            v *= c.beta2
            v += (1 - c.beta2) * grad * grad
            vh = v / (1 - c.beta2 ** self.t) if c.bias_correction else v
            params -= lr * grad / (xp.sqrt(vh) + c.eps)
