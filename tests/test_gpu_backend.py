"""GPU equals CPU: the CuPy backend against the NumPy reference (skipped without a GPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from stores import make_trie

from agpt.backend import NumpyBackend
from agpt.model.config import ModelConfig
from agpt.model.gpt import loss_and_grad
from agpt.model.params import init_params
from agpt.store.trie import open_trie
from agpt.train.batches import unit_batch, window_batch, window_starts
from agpt.train.objective import Weighting
from agpt.train.trie_trainer import load_unit, unit_count
from agpt.train.units import chunks

cp = pytest.importorskip("cupy")
pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu():
    from agpt.gpu.backend import CupyBackend, gpu_available
    if not gpu_available():
        pytest.skip("no CUDA device")
    return CupyBackend("float32")   # fp32; CuPy uses TF32 only when CUPY_TF32=1


def poison() -> None:
    """Fill freed pool memory with NaN, so a kernel output element left unwritten shows up."""
    a = cp.full(64 << 20, cp.nan, dtype=cp.float32)
    del a


def grads(be, url, cfg, flat, w, max_rows, truncated):
    t = open_trie(url)
    g = be.xp.zeros_like(flat)
    loss = 0.0
    for i in range(unit_count(t)):
        for c in chunks(load_unit(t, i), max_rows):
            b, _ = unit_batch(be, c, t.vocab_size, w)
            loss += loss_and_grad(cfg, be, flat, b, g, truncated)
    return loss, be.to_host(g)


@pytest.mark.parametrize("scheme", ["unigram", "bigram", "auto"])
@pytest.mark.parametrize("max_rows", [10**9, 37])
@pytest.mark.parametrize("mode", [("linear", 0.0, False), ("sqrt", 1.0, False), ("log", 0.5, True),
                                  ("off", 0.0, True)])
def test_gpu_trie_gradient_equals_cpu(tmp_path: Path, gpu, scheme, max_rows, mode) -> None:
    rng = np.random.default_rng(1)
    D = 8
    kw = {"partition_budget": 60} if scheme == "auto" else {}
    url = make_trie(tmp_path, ["".join(rng.choice(list("abcdef \n"), 600))], D, scheme, **kw)
    V = open_trie(url).vocab_size
    cfg = ModelConfig(V, d_model=32, n_heads=4, n_layers=2, d_ff=64, context=D)
    flat = init_params(cfg, rng)
    w = Weighting(mode[0], mode[1])
    cpu = NumpyBackend("float32")
    lc, gc = grads(cpu, url, cfg, flat, w, max_rows, mode[2])
    poison()
    lg, gg = grads(gpu, url, cfg, gpu.asarray(flat), w, max_rows, mode[2])
    assert abs(lg - lc) <= 1e-5 * abs(lc)
    assert np.abs(gg - gc).max() <= 1e-5 * np.abs(gc).max()


def test_gpu_window_gradient_equals_cpu(tmp_path: Path, gpu) -> None:
    rng = np.random.default_rng(2)
    toks = rng.integers(0, 20, 500)
    cfg = ModelConfig(20, d_model=32, n_heads=4, n_layers=2, d_ff=64, context=16)
    flat = init_params(cfg, rng)
    st, ln = window_starts([(0, len(toks))], 16)
    out = []
    for be in (NumpyBackend("float32"), gpu):
        b, _ = window_batch(be, toks, st[:64], ln[:64], 16)
        g = be.xp.zeros_like(be.asarray(flat))
        loss = loss_and_grad(cfg, be, be.asarray(flat), b, g)
        out.append((loss, be.to_host(g)))
    assert abs(out[0][0] - out[1][0]) <= 1e-5 * abs(out[0][0])
    assert np.abs(out[0][1] - out[1][1]).max() <= 1e-5 * np.abs(out[0][1]).max()


def test_gpu_segment_sum_and_scatter(gpu) -> None:
    rng = np.random.default_rng(3)
    y = rng.standard_normal((1000, 24)).astype(np.float32)
    starts = np.unique(np.concatenate([[0], rng.integers(1, 1000, 50)]))
    ref = NumpyBackend().segment_sum(y, starts)
    poison()
    got = gpu.to_host(gpu.segment_sum(gpu.asarray(y), gpu.asarray(starts)))
    assert np.abs(got - ref).max() <= 1e-5
    dst = np.zeros((7, 3), np.float32)
    idx = rng.integers(0, 7, 100)
    src = rng.standard_normal((100, 3)).astype(np.float32)
    d_gpu = gpu.asarray(dst)
    gpu.scatter_add(d_gpu, gpu.asarray(idx), gpu.asarray(src))
    NumpyBackend().scatter_add(dst, idx, src)
    assert np.abs(gpu.to_host(d_gpu) - dst).max() <= 1e-5
