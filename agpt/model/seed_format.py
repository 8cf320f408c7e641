"""The seed's `.model` files (SPEC §7), so models move between the seed and AGPT both ways.

Layout, little-endian: int32 magic 0x4D475054 ("MGPT"), int32 d_model, n_heads, n_layers, d_ff,
vocab, seq_len; then every tensor of agpt.model.params.param_specs in that order (the seed's),
each as int32 rows, int32 cols and rows*cols float32 in row-major order; 1-D tensors (biases,
LayerNorm gamma/beta) are written as [1, n]. Nothing follows the last tensor.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from agpt.errors import AgptError
from agpt.model.config import ModelConfig
from agpt.model.params import n_params, param_specs

MAGIC = 0x4D475054
_HEADER = struct.Struct("<7i")
_DIMS = struct.Struct("<2i")


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    return (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])


def file_size(cfg: ModelConfig) -> int:
    """Exact byte size of the `.model` file of `cfg` (checked before reading any tensor)."""
    return _HEADER.size + _DIMS.size * len(param_specs(cfg)) + 4 * n_params(cfg)


def read_seed_model(path: str | os.PathLike) -> tuple[ModelConfig, np.ndarray]:
    """Config (context = the file's seq_len) and flat float32 parameters of a seed `.model`."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError as e:
        raise AgptError(f"no such model file: {p}") from e
    except IsADirectoryError as e:
        raise AgptError(f"{p} is a directory, not a seed .model file") from e
    if len(raw) < _HEADER.size:
        raise AgptError(f"{p} is truncated ({len(raw)} bytes, shorter than the 28-byte header): "
                        "not a seed .model file")
    magic, d, h, n, f, v, t = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise AgptError(f"{p} is not a seed .model file (magic 0x{magic & 0xFFFFFFFF:08X}, "
                        f"expected 0x{MAGIC:08X} 'MGPT')")
    try:
        cfg = ModelConfig(vocab_size=v, d_model=d, n_heads=h, n_layers=n, d_ff=f, context=t)
    except AgptError as e:
        raise AgptError(f"{p}: invalid header ({e})") from e
    want = file_size(cfg)
    if len(raw) != want:
        what = "truncated" if len(raw) < want else "longer than its header implies"
        raise AgptError(f"{p} is {what} ({len(raw):,} bytes, the header d_model {d}, heads {h}, "
                        f"layers {n}, d_ff {f}, vocab {v} needs {want:,}): the file is damaged")
    flat = np.empty(n_params(cfg), dtype=np.float32)
    pos = _HEADER.size
    for i, s in enumerate(param_specs(cfg)):
        rc = _DIMS.unpack_from(raw, pos)
        if rc != _rows_cols(s.shape):
            raise AgptError(f"{p}: tensor {i} ({s.name}) is {list(rc)}, the header implies "
                            f"{list(_rows_cols(s.shape))}: the file is damaged")
        pos += _DIMS.size
        flat[s.offset: s.offset + s.size] = np.frombuffer(raw, "<f4", s.size, pos)
        pos += 4 * s.size
    if not np.isfinite(flat).all():
        bad = next(s.name for s in param_specs(cfg)
                   if not np.isfinite(flat[s.offset: s.offset + s.size]).all())
        raise AgptError(f"{p}: tensor {bad} holds NaN or Inf: the model diverged or the file is "
                        "damaged")
    return cfg, flat


def write_seed_model(path: str | os.PathLike, cfg: ModelConfig, params: np.ndarray) -> None:
    """Write `params` (cast to float32) as a seed `.model`; the file appears only when complete."""
    params = np.asarray(params)
    if params.shape != (n_params(cfg),):
        raise AgptError(f"parameters have shape {params.shape}, the config needs a flat vector "
                        f"of {n_params(cfg):,}")
    with np.errstate(over="ignore"):  # an overflow becomes Inf, refused just below
        p32 = params.astype("<f4")
    if not np.isfinite(p32).all():
        raise AgptError("the parameters hold NaN or Inf (or overflow float32): refusing to "
                        "export them; use an earlier checkpoint")
    p = Path(path)
    tmp = p.with_name(f".{p.name}.partial")
    try:
        with open(tmp, "wb") as fh:
            fh.write(_HEADER.pack(MAGIC, cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.d_ff,
                                  cfg.vocab_size, cfg.context))
            for s in param_specs(cfg):
                fh.write(_DIMS.pack(*_rows_cols(s.shape)))
                fh.write(p32[s.offset: s.offset + s.size].tobytes())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
