"""Parameters as one flat buffer with named views, in the seed's `.model` tensor order.

One flat buffer makes the optimizer a handful of whole-vector operations (one fused kernel on
the GPU) and makes checkpoints and gradient comparisons trivial; the model reads named views.
"""

from __future__ import annotations

import collections
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from agpt.model.config import ModelConfig


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    init: str        # "normal:<std>" | "zeros" | "ones"
    offset: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


@functools.cache
def param_specs(cfg: ModelConfig) -> tuple[ParamSpec, ...]:
    """Every tensor in the seed's order (SPEC §7): y = x·W + b for every matrix."""
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    raw: list[tuple[str, tuple[int, ...], str]] = [("tok_emb", (v, d), f"normal:{(1 / d) ** .5}")]
    lin = f"normal:{(2 / d) ** .5}"
    for i in range(cfg.n_layers):
        p = f"l{i}."
        for m in ("wq", "wk", "wv", "wo"):
            raw += [(p + m + ".w", (d, d), lin), (p + m + ".b", (d,), "zeros")]
        raw += [(p + "ln1.g", (d,), "ones"), (p + "ln1.b", (d,), "zeros"),
                (p + "ff1.w", (d, f), lin), (p + "ff1.b", (f,), "zeros"),
                (p + "ff2.w", (f, d), f"normal:{(2 / f) ** .5}"), (p + "ff2.b", (d,), "zeros"),
                (p + "ln2.g", (d,), "ones"), (p + "ln2.b", (d,), "zeros")]
    raw += [("lnf.g", (d,), "ones"), ("lnf.b", (d,), "zeros"),
            ("out.w", (d, v), lin), ("out.b", (v,), "zeros")]
    out, off = [], 0
    for name, shape, init in raw:
        out.append(ParamSpec(name, shape, init, off))
        off += int(np.prod(shape))
    return tuple(out)


def n_params(cfg: ModelConfig) -> int:
    s = param_specs(cfg)[-1]
    return s.offset + s.size


def init_params(cfg: ModelConfig, rng: np.random.Generator, dtype: Any = np.float32) -> np.ndarray:
    """A fresh flat parameter vector (SPEC §7 init: N(0, 2/d_in) linears, N(0, 1/d) embedding)."""
    flat = np.zeros(n_params(cfg), dtype=np.float64)
    for s in param_specs(cfg):
        seg = flat[s.offset: s.offset + s.size]
        if s.init == "ones":
            seg[:] = 1.0
        elif s.init.startswith("normal:"):
            seg[:] = rng.standard_normal(s.size) * float(s.init.split(":")[1])
    return flat.astype(dtype)


#: the views of the last few buffers: a training step asks for the same two (parameters and
#: gradient) several times, and building ~30 views costs ~1 ms of host time on the GPU
_VIEWS: collections.OrderedDict[int, tuple[Any, ModelConfig, dict[str, Any]]] = \
    collections.OrderedDict()


def views(flat: Any, cfg: ModelConfig) -> dict[str, Any]:
    """Named views into a flat buffer (NumPy or CuPy): writing a view writes the buffer."""
    hit = _VIEWS.get(id(flat))
    if hit is not None and hit[0] is flat and hit[1] == cfg:
        return hit[2]
    out = {s.name: flat[s.offset: s.offset + s.size].reshape(s.shape) for s in param_specs(cfg)}
    _VIEWS[id(flat)] = (flat, cfg, out)
    while len(_VIEWS) > 8:
        _VIEWS.popitem(last=False)
    return out
