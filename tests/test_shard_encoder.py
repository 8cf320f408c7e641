"""The direct shard encoder writes exactly the bytes Zarr writes (format version 1)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from agpt.store.corpus import BlockWriter
from agpt.store.format import ShardEncoder, create_array


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint32, np.int64])
@pytest.mark.parametrize("n_shards", [0.3, 1.0, 2.0, 2.7])
def test_encoder_bytes_equal_zarr(tmp_path: Path, dtype, n_shards: float) -> None:
    dt = np.dtype(dtype)
    shard = (1 << 22) // dt.itemsize
    n = max(1, int(n_shards * shard))
    rng = np.random.default_rng(n)
    data = (np.cumsum(rng.integers(0, 7, n)) % 5000).astype(dt)
    ga = zarr.open_group(str(tmp_path / "a.zarr"), mode="w", zarr_format=3)
    gb = zarr.open_group(str(tmp_path / "b.zarr"), mode="w", zarr_format=3)
    a, b = create_array(ga, "x", n, dt), create_array(gb, "x", n, dt)
    for i in range(0, n, shard):  # Zarr itself, one whole shard per write
        a[i: i + shard] = data[i: i + shard]
    w = BlockWriter(b, inflight=2)
    assert w.enc is not None
    with w:
        for i in range(0, n, 100_003):
            w.write(data[i: i + 100_003])
    assert _files(tmp_path / "a.zarr") == _files(tmp_path / "b.zarr")
    assert np.array_equal(zarr.open_array(str(tmp_path / "b.zarr" / "x"))[:], data)
    assert os.listdir(tmp_path / "b.zarr" / "x" / "c")


def test_encoder_refuses_other_layouts(tmp_path: Path) -> None:
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    small = create_array(g, "small", 10, np.int64)  # one chunk, unsharded
    assert ShardEncoder.for_array(small) is None
    plain = g.create_array("plain", shape=(1 << 20,), dtype=np.int64, chunks=(1 << 10,),
                           shards=(1 << 14,))  # default codecs (zstd, no crc32c)
    assert ShardEncoder.for_array(plain) is None
    two_d = create_array(g, "two_d", (1 << 20, 4), np.int64)
    assert ShardEncoder.for_array(two_d) is None


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096 + 17])
def test_write_file_direct_writes_the_bytes(tmp_path, size: int) -> None:
    """Direct (page-cache-bypassing) shard writes land the same bytes, atomically renamed."""
    from agpt.store.format import write_file_direct

    blob = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "c" / "0"
    if not write_file_direct(str(path), blob):
        pytest.skip("this file system refuses O_DIRECT")
    assert path.read_bytes() == blob
    assert [p.name for p in path.parent.iterdir()] == ["0"]  # no temporary file left
