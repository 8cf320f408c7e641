"""The on-disk conventions shared by every AGPT store (see docs/FORMAT.md).

Everything that decides how bytes land on disk lives here: the format version, the codec
chain (Blosc/zstd + crc32c, never pickle or object dtypes), chunk/shard sizes, and the
status attribute that makes builds atomic (a store opens only when status == "complete").
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import errno
import os
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.sync import sync  # runs a coroutine on Zarr's event loop

from agpt import __version__
from agpt.errors import StoreFormatError

FORMAT_VERSION = 1
CORPUS_KIND = "agpt-corpus"
TRIE_KIND = "agpt-trie"
STATUS_BUILDING = "building"
STATUS_COMPLETE = "complete"

#: elements per chunk (the unit of compression / checksum) and per shard (one file) of a
#: 1-byte dtype; wider dtypes get proportionally fewer elements so that a chunk is 256 KiB
#: and a shard 4 MiB whatever the dtype (writers buffer one shard per array).
CHUNK = 1 << 18
SHARD = 1 << 22


def compressors() -> list:
    """Blosc-zstd with byte shuffle, then a crc32c checksum of every chunk."""
    return [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"), Crc32cCodec()]


#: the dtypes a store's token ids may have, smallest first
TOKEN_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32))


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds ids 0..vocab_size-1 (ids are never assumed to be bytes)."""
    for dt in TOKEN_DTYPES:
        if vocab_size <= 1 << (8 * dt.itemsize):
            return dt
    raise StoreFormatError(f"vocabulary of {vocab_size} ids does not fit uint32; use a smaller tokenizer")


def open_root(url: str, mode: str, storage_options: Mapping[str, Any] | None = None) -> zarr.Group:
    """Open the Zarr v3 group at a local path or fsspec URL, mapping failures to one-line errors."""
    try:
        kw = {"storage_options": dict(storage_options)} if storage_options else {}
        return zarr.open_group(url, mode=mode, zarr_format=3, **kw)
    except FileNotFoundError as e:
        raise StoreFormatError(f"no store at {url}: build or ingest it first") from e
    except (OSError, ConnectionError, TimeoutError) as e:
        raise StoreFormatError(f"cannot reach store {url}: {e}") from e
    except (ValueError, KeyError, TypeError) as e:
        raise StoreFormatError(f"{url} is not a Zarr v3 store ({e})") from e


def create_array(group: zarr.Group, name: str, shape: int | tuple[int, ...], dtype: Any,
                 chunk: int = CHUNK, shard: int = SHARD) -> zarr.Array:
    """A 1-D (or row-chunked 2-D) array with the project's codecs; big arrays are sharded."""
    shape = (shape,) if isinstance(shape, int | np.integer) else tuple(int(s) for s in shape)
    row_bytes = np.dtype(dtype).itemsize * int(np.prod(shape[1:], dtype=np.int64))
    chunk = max(1, chunk // row_bytes)
    shard = max(chunk, shard // row_bytes)
    n = max(int(shape[0]), 1)
    rows = max(1, min(chunk, n))
    chunks = (rows,) + shape[1:]
    kw: dict[str, Any] = {}
    if n > chunk:
        srows = max(rows, min(shard, n))
        srows = -(-srows // rows) * rows
        kw["shards"] = (srows,) + shape[1:]
    # Every chunk is written, even all-zero ones, so a missing chunk always means damage.
    return group.create_array(name, shape=shape, dtype=np.dtype(dtype), chunks=chunks,
                              compressors=compressors(), fill_value=0, overwrite=True,
                              config={"write_empty_chunks": True}, **kw)


class ShardEncoder:
    """Encodes and stores whole shards of a 1-D sharded array made by `create_array`, byte for
    byte as Zarr would, without Zarr's per-chunk machinery (buffers filled with the fill value,
    then copied, an event loop round trip per chunk); the codecs are the array's own objects.

    `for_array` returns None for any array whose codecs or layout are not the ones
    `create_array` makes; callers then write through Zarr.
    """

    MISSING = np.uint64(2**64 - 1)

    def __init__(self, arr: zarr.Array, blosc: Any):
        self.arr = arr
        self.blosc = blosc
        self.chunk = int(arr.metadata.codecs[0].chunk_shape[0])
        self.shard = int(arr.shards[0])
        self.per_shard = self.shard // self.chunk
        self.dtype = np.dtype(arr.dtype).newbyteorder("<")

    @classmethod
    def for_array(cls, arr: zarr.Array) -> ShardEncoder | None:
        from zarr.codecs import BytesCodec, ShardingCodec
        try:
            codecs = arr.metadata.codecs
            if arr.ndim != 1 or arr.shards is None or len(codecs) != 1:
                return None
            sc = codecs[0]
            if not isinstance(sc, ShardingCodec) or sc.index_location.value != "end":
                return None
            inner, index = sc.codecs, sc.index_codecs
            if not (len(inner) == 3 and isinstance(inner[0], BytesCodec)
                    and isinstance(inner[1], BloscCodec) and isinstance(inner[2], Crc32cCodec)
                    and len(index) == 2 and isinstance(index[0], BytesCodec)
                    and isinstance(index[1], Crc32cCodec)):
                return None
            if inner[0].endian not in (None, "little") and getattr(inner[0].endian, "value",
                                                                     None) != "little":
                return None
            if index[0].endian is not None and getattr(index[0].endian, "value", "") != "little":
                return None
            if arr.metadata.fill_value != 0 or arr.shards[0] % sc.chunk_shape[0]:
                return None
            if arr.metadata.encode_chunk_key((7,)) != "c/7":
                return None
            blosc = inner[1]._blosc_codec
        except (AttributeError, TypeError, IndexError):
            return None
        return cls(arr, blosc)

    def encode(self, data: np.ndarray) -> bytes:
        """The stored bytes of one shard holding `data` (<= one shard, from its start)."""
        import google_crc32c

        data = np.ascontiguousarray(data, dtype=self.dtype)
        index = np.full((self.per_shard, 2), self.MISSING, dtype="<u8")
        parts = []
        at = 0
        for c in range(-(-len(data) // self.chunk)):
            piece = data[c * self.chunk: (c + 1) * self.chunk]
            if len(piece) < self.chunk:  # a partial last chunk is stored whole, zero-filled
                piece = np.concatenate((piece, np.zeros(self.chunk - len(piece), self.dtype)))
            body = self.blosc.encode(piece)
            parts.append(body)
            parts.append(google_crc32c.value(body).to_bytes(4, "little"))
            index[c] = (at, len(body) + 4)
            at += len(body) + 4
        raw = index.tobytes()
        parts.append(raw)
        parts.append(google_crc32c.value(raw).to_bytes(4, "little"))
        return b"".join(parts)

    def write(self, shard_index: int, data: np.ndarray) -> None:
        """Encode and store shard `shard_index` (safe to call from several threads at once)."""
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        blob = self.encode(data)
        key = self.arr.metadata.encode_chunk_key((shard_index,))
        path = self._local_path(key)
        if path is not None and write_file_direct(path, blob):
            return
        buf = default_buffer_prototype().buffer.from_bytes(blob)
        sync((self.arr.store_path / key).set(buf))

    def _local_path(self, key: str) -> str | None:
        """The file of `key` when the array lives in a local directory store, else None."""
        from zarr.storage import LocalStore

        sp = self.arr.store_path
        if type(sp.store) is not LocalStore:
            return None
        return os.path.join(str(sp.store.root), *[p for p in (sp.path, key) if p])


#: O_DIRECT alignment of file offsets, lengths and buffer addresses
_DIRECT_ALIGN = 4096


def write_file_direct(path: str, blob: bytes) -> bool:
    """Write `blob` to `path` as a local Zarr store would (a temporary file renamed into
    place), bypassing the page cache for all but the last partial block; False (nothing
    written) where the file system refuses O_DIRECT.

    A 100 MB build writes ~2 GB of shards; through the page cache each byte lands in freshly
    allocated cache pages, whose first touch costs ~1-2 s of system time per GB on the
    build VMs.
    """
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.partial"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o644)
    except OSError:
        return False
    n = len(blob) // _DIRECT_ALIGN * _DIRECT_ALIGN
    try:
        refused = False
        try:
            if n:
                raw = np.empty(n + _DIRECT_ALIGN, np.uint8)
                skip = (-raw.ctypes.data) % _DIRECT_ALIGN
                buf = raw[skip: skip + n]
                buf[:] = np.frombuffer(blob, np.uint8, n)
                view = memoryview(buf)
                while len(view):
                    view = view[os.write(fd, view):]
        except OSError as e:  # opened with O_DIRECT, but the writes are refused
            if e.errno != errno.EINVAL:
                raise
            refused = True
        finally:
            os.close(fd)
        if refused:
            os.unlink(tmp)
            return False
        if n < len(blob):
            with open(tmp, "ab") as f:
                f.write(memoryview(blob)[n:])
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return True


def write_array(group: zarr.Group, name: str, data: np.ndarray, **kw: Any) -> zarr.Array:
    """Create `name` and write `data` into it in one call (zarr encodes chunks concurrently)."""
    data = np.ascontiguousarray(data)
    arr = create_array(group, name, data.shape, data.dtype, **kw)
    if data.size:
        arr[...] = data
    return arr


def header(kind: str, **extra: Any) -> dict[str, Any]:
    """The `agpt` attribute every store carries; status starts as building."""
    return {
        "format": kind,
        "format_version": FORMAT_VERSION,
        "status": STATUS_BUILDING,
        "writer": f"agpt {__version__}",
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **extra,
    }


def check_header(group: zarr.Group, kind: str, url: str, require_complete: bool = True) -> dict[str, Any]:
    """Return the `agpt` attribute after checking kind, version and completion."""
    meta = group.attrs.get("agpt")
    if not isinstance(meta, dict) or meta.get("format") not in (CORPUS_KIND, TRIE_KIND):
        raise StoreFormatError(f"{url} is a Zarr store but not an AGPT store")
    if meta["format"] != kind:
        raise StoreFormatError(f"{url} is an {meta['format']} store, expected {kind}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise StoreFormatError(
            f"{url} has format version {meta.get('format_version')}, this agpt reads version "
            f"{FORMAT_VERSION}: rebuild it with this version")
    if require_complete and meta.get("status") != STATUS_COMPLETE:
        raise StoreFormatError(
            f"{url} is an unfinished build (status {meta.get('status')!r}): rerun the same "
            "command to resume it")
    if require_complete:
        check_chunks(group, url)
    return meta


def check_chunks(group: zarr.Group, url: str) -> None:
    """Every chunk of every array must exist: Zarr would read a missing one as zeros."""
    for name, arr in group.members(max_depth=None):
        if isinstance(arr, zarr.Array) and arr.nchunks_initialized < arr.nchunks:
            raise StoreFormatError(
                f"{url}: array {name!r} is missing {arr.nchunks - arr.nchunks_initialized} of "
                f"{arr.nchunks} chunks; the store is damaged: rebuild it")


def mark_complete(group: zarr.Group, **updates: Any) -> None:
    """Last write of every build: only now does the store open as complete."""
    meta = dict(group.attrs["agpt"])
    meta.update(updates)
    meta["status"] = STATUS_COMPLETE
    group.attrs["agpt"] = meta


def read_array(group: zarr.Group, name: str, url: str, sel: Any = Ellipsis) -> np.ndarray:
    """Read (part of) an array, turning a missing or corrupt chunk into a StoreFormatError."""
    return read_arrays(group, {name: sel}, url)[name]


def read_arrays(group: zarr.Group, sels: Mapping[str, Any], url: str,
                opened: dict[str, zarr.Array] | None = None) -> dict[str, np.ndarray]:
    """Read parts of several arrays in one Zarr round trip (errors as in `read_array`);
    `opened` caches the array handles between calls (opening one parses its metadata);
    a selection is a slice or Ellipsis, or a 1-D integer array of indices.

    Every synchronous Zarr read is a hand-off to Zarr's one event-loop thread, and a shard's
    index is read again by each call: a partition read as eight separate calls spent most of
    its time there (and under the GIL), so loader threads could not read in parallel."""
    arrays = {} if opened is None else opened
    for name in sels:
        if name not in arrays:
            try:
                arrays[name] = group[name]
            except KeyError as e:
                raise StoreFormatError(f"{url}: array {name!r} is missing; the store is "
                                       "damaged") from e

    def get(name: str, sel: Any) -> Any:
        a = arrays[name].async_array
        return a.get_orthogonal_selection(sel) if isinstance(sel, np.ndarray) else a.getitem(sel)

    async def gather() -> list[Any]:
        return await asyncio.gather(*(get(n, sel) for n, sel in sels.items()),
                                    return_exceptions=True)

    out = {}
    for name, got in zip(sels, sync(gather()), strict=True):
        if isinstance(got, StoreFormatError):
            raise got
        if isinstance(got, Exception):   # zarr raises codec-specific errors on bad checksums
            raise StoreFormatError(f"{url}: array {name!r} is corrupt ({type(got).__name__}: "
                                   f"{got}); rebuild the store") from got
        if isinstance(got, BaseException):
            raise got
        out[name] = np.asarray(got)
    return out
