"""Checkpoints: model weights, optimizer slots, config, vocabulary and trainer state (SPEC §7).

A checkpoint is a Zarr v3 group written with the shared store conventions (docs/FORMAT.md,
"Checkpoint"): one array per named tensor so a weight can be read by name, crc32c on every
chunk, no pickle, and a `status` attribute so a half-written checkpoint never opens. Local saves
are atomic on top of that: the new checkpoint is written to a sibling directory and swapped in
only once complete, so an interrupted save (Ctrl-C, disk full) never loses the previous one.
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from agpt.errors import AgptError, StoreFormatError
from agpt.model.config import ModelConfig
from agpt.model.params import n_params, param_specs
from agpt.store.format import (
    CORPUS_KIND,
    FORMAT_VERSION,
    STATUS_COMPLETE,
    TRIE_KIND,
    check_chunks,
    header,
    mark_complete,
    open_root,
    read_array,
    write_array,
)

CHECKPOINT_KIND = "agpt-checkpoint"
PARAM_DTYPES = ("float32", "float64")
#: bit generators rng_from_state may rebuild (all NumPy ships; never an arbitrary attribute).
BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")
_SLOT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass
class Checkpoint:
    """Everything needed to resume training exactly, or to evaluate/export a model."""

    config: ModelConfig
    params: np.ndarray                  # flat vector in agpt.model.params layout
    opt_state: dict[str, np.ndarray] = field(default_factory=dict)  # slot -> flat like params
    tokenizer: dict[str, Any] = field(default_factory=dict)  # Tokenizer.to_meta()
    state: dict[str, Any] = field(default_factory=dict)      # JSON-able trainer state


# -- RNG state ---------------------------------------------------------------------------------

def _enc(v: Any) -> Any:
    """JSON form of a bit-generator state: ints as decimal strings (they exceed 2**63)."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, np.ndarray):
        return {"ndarray": v.dtype.str, "shape": list(v.shape),
                "values": [str(int(x)) for x in v.reshape(-1)]}
    if isinstance(v, Mapping):
        return {str(k): _enc(x) for k, x in v.items()}
    if isinstance(v, str):
        return v
    raise AgptError(f"cannot store an RNG state holding {type(v).__name__}")


def _dec(v: Any) -> Any:
    if isinstance(v, str) and re.fullmatch(r"-?\d+", v):
        return int(v)
    if isinstance(v, Mapping):
        if "ndarray" in v:
            vals = [int(x) for x in v["values"]]
            return np.array(vals, dtype=np.dtype(v["ndarray"])).reshape(v["shape"])
        return {k: _dec(x) for k, x in v.items()}
    return v


def rng_to_state(gen: np.random.Generator) -> dict[str, Any]:
    """A Generator's exact state as JSON-able data (ints as strings: JSON readers lose > 2**53)."""
    return _enc(gen.bit_generator.state)


def rng_from_state(d: Mapping[str, Any]) -> np.random.Generator:
    """Rebuild the Generator that rng_to_state saw, continuing the same stream bit for bit."""
    name = d.get("bit_generator") if isinstance(d, Mapping) else None
    if name not in BIT_GENERATORS:
        raise AgptError(f"unknown RNG bit generator {name!r} in the checkpoint state; expected "
                        f"one of {', '.join(BIT_GENERATORS)}")
    bg = getattr(np.random, name)()
    try:
        bg.state = _dec(d)
    except (TypeError, ValueError, KeyError) as e:
        raise AgptError(f"the checkpoint's {name} RNG state is malformed ({e})") from e
    return np.random.Generator(bg)


# -- JSON sanitising -----------------------------------------------------------------------------

def _jsonable(v: Any, where: str) -> Any:
    """Plain JSON types (NumPy scalars -> Python, tuples -> lists) so attributes round-trip."""
    if v is None or isinstance(v, bool | str):
        return v
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, int | np.integer):
        return int(v)
    if isinstance(v, float | np.floating):
        f = float(v)
        if not math.isfinite(f):  # JSON has no NaN/Inf; keep them readable, not lossy
            return {"float": repr(f)}
        return f
    if isinstance(v, Mapping):
        out = {}
        for k, x in v.items():
            if not isinstance(k, str):
                raise AgptError(f"checkpoint {where}: key {k!r} is not a string (JSON keys are)")
            out[k] = _jsonable(x, f"{where}.{k}")
        return out
    if isinstance(v, list | tuple):
        return [_jsonable(x, f"{where}[{i}]") for i, x in enumerate(v)]
    raise AgptError(f"checkpoint {where} holds a {type(v).__name__}, which is not JSON-able; "
                    "store plain numbers, strings, lists and dicts (rng_to_state for RNGs)")


def _unjson(v: Any) -> Any:
    if isinstance(v, dict):
        if set(v) == {"float"} and isinstance(v["float"], str):
            return float(v["float"])
        return {k: _unjson(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_unjson(x) for x in v]
    return v


# -- paths -----------------------------------------------------------------------------------

def _local_path(url: str) -> Path | None:
    """The local path of a URL, or None for a remote (fsspec) one."""
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    return None if "://" in url else Path(url)


def _existing_kind(url: str) -> str | None:
    """None if nothing is at `url`, else the `agpt` format there ("" when not an AGPT group)."""
    local = _local_path(url)
    if local is not None:
        if not local.exists() or (local.is_dir() and not any(local.iterdir())):
            return None
        if not (local / "zarr.json").is_file():
            return ""
    try:
        group = zarr.open_group(url, mode="r", zarr_format=3)
    except FileNotFoundError:
        return None
    except Exception:  # noqa: BLE001 - anything unreadable is "not ours"
        return ""
    meta = group.attrs.get("agpt")
    return str(meta.get("format", "")) if isinstance(meta, dict) else ""


def check_save_target(url: str, overwrite: bool) -> None:
    """Refuse early when `url` holds a non-checkpoint, or a checkpoint and not `overwrite`."""
    kind = _existing_kind(url)
    if kind is None:
        return
    if kind != CHECKPOINT_KIND:
        what = f"an {kind} store" if kind else "something that is not a checkpoint"
        raise AgptError(f"{url} holds {what}: refusing to overwrite it; choose another path")
    if not overwrite:
        raise AgptError(f"checkpoint {url} already exists: pass --force to overwrite it, or "
                        "choose another path")


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(tmp: Path, dst: Path) -> None:
    """Put the finished `tmp` at `dst`; an old `dst` is removed only after the swap."""
    if not dst.exists():
        os.replace(tmp, dst)
        return
    if _exchange(tmp, dst):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old checkpoint
        return
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dst, old)   # a crash between these two renames leaves the old one at `old`
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


# -- save / load ----------------------------------------------------------------------------

def _validate(ck: Checkpoint) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    cfg = ck.config
    n = n_params(cfg)
    params = np.asarray(ck.params)
    if params.dtype.name not in PARAM_DTYPES:
        raise AgptError(f"checkpoint parameters must be float32 or float64, got {params.dtype}")
    if params.shape != (n,):
        raise AgptError(f"checkpoint parameters have shape {params.shape}, the config needs a flat "
                        f"vector of {n:,}")
    slots: dict[str, np.ndarray] = {}
    for name, arr in ck.opt_state.items():
        a = np.asarray(arr)
        if not _SLOT_NAME.match(name):
            raise AgptError(f"optimizer slot name {name!r} must be letters, digits, _ . -")
        if a.shape != (n,) or a.dtype.kind != "f":
            raise AgptError(f"optimizer slot {name!r} has shape {a.shape} and dtype {a.dtype}; it "
                            f"must be a flat float vector of {n:,} like the parameters")
        slots[name] = a
    tv = ck.tokenizer.get("vocab_size") if isinstance(ck.tokenizer, Mapping) else None
    if tv is not None and int(tv) != cfg.vocab_size:
        raise AgptError(f"the checkpoint's tokenizer has {tv} symbols but its model config has "
                        f"vocabulary {cfg.vocab_size}")
    return params, slots


def _write(group: zarr.Group, ck: Checkpoint, params: np.ndarray,
           slots: dict[str, np.ndarray]) -> None:
    specs = param_specs(ck.config)
    group.attrs["agpt"] = header(
        CHECKPOINT_KIND, config=ck.config.to_dict(), n_params=int(params.size),
        param_dtype=params.dtype.name, tensors=[s.name for s in specs],
        optimizer_slots={k: v.dtype.name for k, v in slots.items()},
        tokenizer=_jsonable(dict(ck.tokenizer), "tokenizer"), state=_jsonable(ck.state, "state"))
    for prefix, flat in [("params", params), *((f"optimizer/{k}", v) for k, v in slots.items())]:
        for s in specs:
            write_array(group, f"{prefix}/{s.name}", flat[s.offset: s.offset + s.size].reshape(s.shape))
    mark_complete(group)


def save_checkpoint(url: str, ck: Checkpoint, overwrite: bool = True) -> None:
    """Write `ck` to `url`; a local save replaces an old checkpoint only once complete.

    Refuses to replace anything that is not a checkpoint, and any existing checkpoint unless
    `overwrite`. Remote (fsspec) saves are not atomic, but the status attribute still keeps an
    interrupted one from opening.
    """
    params, slots = _validate(ck)
    check_save_target(url, overwrite)
    local = _local_path(url)
    if local is None:
        _write(open_root(url, "w"), ck, params, slots)
        return
    local = Path(os.path.abspath(local))
    tmp = local.with_name(f".{local.name}.partial")
    try:
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a previous interrupted save
        _write(open_root(str(tmp), "w"), ck, params, slots)
        _swap_in(tmp, local)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, AgptError):
            raise AgptError(f"saving checkpoint {url} failed ({e.strerror or e}); the previous "
                            "checkpoint, if any, is intact") from e
        raise


def _check_header(group: zarr.Group, url: str) -> dict[str, Any]:
    meta = group.attrs.get("agpt")
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt in (CORPUS_KIND, TRIE_KIND):
        raise StoreFormatError(f"{url} is an {fmt} store, not a checkpoint: pass a checkpoint "
                               "written by agpt init or agpt train")
    if fmt != CHECKPOINT_KIND:
        raise StoreFormatError(f"{url} is a Zarr store but not an AGPT checkpoint")
    if meta.get("format_version") != FORMAT_VERSION:
        raise StoreFormatError(
            f"{url} is a checkpoint of format version {meta.get('format_version')}, this agpt "
            f"reads version {FORMAT_VERSION}: export it with the agpt that wrote it")
    if meta.get("status") != STATUS_COMPLETE:
        raise StoreFormatError(f"{url} is an incomplete checkpoint (status {meta.get('status')!r}"
                               "): its save was interrupted; use an earlier checkpoint")
    check_chunks(group, url)
    return meta


def _read_flat(group: zarr.Group, url: str, prefix: str, cfg: ModelConfig,
               dtype: np.dtype) -> np.ndarray:
    specs = param_specs(cfg)
    try:
        sub = group[prefix]
        have = {name for name, _ in sub.arrays()}
    except KeyError as e:
        raise StoreFormatError(f"{url}: group {prefix!r} is missing; the checkpoint is damaged") from e
    want = {s.name for s in specs}
    if have != want:
        odd = sorted(have ^ want)[:3]
        raise StoreFormatError(f"{url}: {prefix}/ holds other tensors than its config "
                               f"({', '.join(odd)}...): the checkpoint was written by a different "
                               "config or is damaged")
    flat = np.empty(n_params(cfg), dtype=dtype)
    for s in specs:
        name = f"{prefix}/{s.name}"
        arr = group[name]
        if tuple(arr.shape) != s.shape:
            raise StoreFormatError(f"{url}: tensor {name} has shape {tuple(arr.shape)}, its config "
                                   f"needs {s.shape}: the checkpoint was written by a different "
                                   "config or is damaged")
        flat[s.offset: s.offset + s.size] = read_array(group, name, url).reshape(-1)
    return flat


def load_checkpoint(url: str) -> Checkpoint:
    """Open a complete checkpoint; foreign, old, unfinished or damaged -> StoreFormatError."""
    local = _local_path(url)
    if local is not None and not local.exists():
        raise StoreFormatError(f"no checkpoint at {url}: create one with agpt init or agpt train")
    group = open_root(url, "r")
    meta = _check_header(group, url)
    try:
        cfg = ModelConfig.from_dict(dict(meta["config"]))
        dtype = np.dtype(meta["param_dtype"])
        slots = dict(meta.get("optimizer_slots") or {})
        tokenizer = _unjson(dict(meta["tokenizer"]))
        state = _unjson(dict(meta["state"]))
    except (KeyError, TypeError, ValueError) as e:
        raise StoreFormatError(f"{url}: checkpoint attributes are missing {e}; it is damaged") from e
    except AgptError as e:
        raise StoreFormatError(f"{url}: invalid model config in the checkpoint ({e})") from e
    if dtype.name not in PARAM_DTYPES or int(meta.get("n_params", -1)) != n_params(cfg):
        raise StoreFormatError(f"{url}: parameter count/dtype disagree with the config; the "
                               "checkpoint is damaged")
    tv = tokenizer.get("vocab_size")
    if tv is not None and int(tv) != cfg.vocab_size:
        raise StoreFormatError(f"{url}: tokenizer of {tv} symbols but model vocabulary "
                               f"{cfg.vocab_size}; the checkpoint is damaged")
    params = _read_flat(group, url, "params", cfg, dtype)
    opt = {k: _read_flat(group, url, f"optimizer/{k}", cfg, np.dtype(v)) for k, v in slots.items()}
    return Checkpoint(cfg, params, opt, tokenizer, state)


def check_vocabulary(ck_tokenizer: Mapping[str, Any], corpus_tokenizer: Mapping[str, Any],
                     what: str) -> None:
    """Refuse a model whose vocabulary is not the corpus's: ids would mean other symbols."""
    def desc(t: Mapping[str, Any]) -> tuple[str, list[int], int]:
        vocab = [int(x) for x in t.get("vocab", [])]
        return str(t.get("tokenizer", "?")), vocab, int(t.get("vocab_size", len(vocab)))

    (kn, kv, ks), (cn, cv, cs) = desc(ck_tokenizer), desc(corpus_tokenizer)
    if (kn, kv, ks) == (cn, cv, cs):
        return
    same = " (same size, different symbols)" if ks == cs else ""
    raise AgptError(f"{what}: the model's vocabulary ({ks} {kn} symbols) differs from the "
                    f"corpus's ({cs} {cn} symbols){same}: use a checkpoint made for this corpus "
                    "(agpt init STORE) or the store the model was trained on")


def describe(ck: Checkpoint) -> str:
    """One line for reports: shape, parameter count, dtype."""
    c = ck.config
    return (f"d_model {c.d_model}, {c.n_heads} heads, {c.n_layers} layers, d_ff {c.d_ff}, "
            f"context {c.context}, vocabulary {c.vocab_size}: {ck.params.size:,} parameters "
            f"({ck.params.dtype.name})")


__all__ = ["CHECKPOINT_KIND", "Checkpoint", "check_vocabulary", "describe", "load_checkpoint",
           "check_save_target", "rng_from_state", "rng_to_state", "save_checkpoint"]
