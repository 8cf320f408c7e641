"""Each CUDA kernel (agpt/gpu/kernels.py) against the NumPy reference method it replaces.

The reference runs in float64 on the same (fp32-representable) inputs; fp32 kernels must match
it within 1e-5 of the largest magnitude, float64 kernels within 1e-10. Freed pool memory is
poisoned with NaN before each kernel, so an output element left unwritten fails the test.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import poison
from forests import forest, random_forest

from agpt.backend import NumpyBackend
from agpt.gpu.tiles import host_tiles
from agpt.model.layout import WindowLayout, tree_layout

cp = pytest.importorskip("cupy")
pytestmark = pytest.mark.gpu


REF = NumpyBackend("float64")
TOL = {np.float32: 1e-5, np.float64: 1e-10}


def close(got, ref, dtype) -> None:
    got = cp.asnumpy(got).astype(np.float64)
    scale = max(1e-30, float(np.abs(ref).max()))
    assert np.isfinite(got).all()
    assert float(np.abs(got - ref).max()) <= TOL[dtype] * scale


# (kind, rows, max depth, tile rows: None = the layout's default); tiles of 32/64 put many
# tile boundaries inside chains and subtrees; N below, at and off multiples of the tile.
SHAPES = [("random", 1, 1, None), ("random", 37, 4, None), ("random", 3000, 8, None),
          ("wide", 5000, 16, None), ("wide", 2000, 32, None), ("random", 3000, 8, 32),
          ("wide", 2000, 32, 64), ("chains", 1000, 32, None), ("chains", 256, 32, None),
          ("chains", 1000, 32, 32), ("chains", 1000, 32, 64), ("broom", 5003, 32, None),
          ("broom", 5003, 32, 64), ("broom", 100, 32, None),
          ("star", 777, 2, None), ("flat", 300, 1, None), ("flat", 300, 1, 32)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("truncated", [False, True])
def test_tree_attention_kernels(gpu, dtype, shape, truncated) -> None:
    kind, n, dm, tile = shape
    rng = np.random.default_rng(n + dm)
    parent, depth = forest(kind, n, dm, rng)
    h, e = 4, 16
    q, k, v, do = (rng.standard_normal((n, h, e)).astype(dtype) for _ in range(4))
    tree = tree_layout(parent, depth)
    o_ref, p_ref = REF.tree_attention(*(a.astype(np.float64) for a in (q, k, v)), tree)
    back_ref = REF.tree_attention_backward(*(a.astype(np.float64) for a in (do, q, k, v)), p_ref,
                                           tree, truncated)
    be = type(gpu)(np.dtype(dtype).name)
    t = be.tree_layout(parent, depth, tiles=host_tiles(parent, depth, tile=tile) if tile else None)
    dq_, dk_, dv_ = (cp.asarray(a) for a in (q, k, v))
    poison()
    o, att = be.tree_attention(dq_, dk_, dv_, t)
    close(o, o_ref, dtype)
    poison()
    for got, ref in zip(be.tree_attention_backward(cp.asarray(do), dq_, dk_, dv_, att, t, truncated),
                        back_ref, strict=True):
        close(got, ref, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", [32, 64, 100])
def test_layernorm_kernels(gpu, dtype, d) -> None:
    rng = np.random.default_rng(d)
    n = 4099
    x, dy = (rng.standard_normal((n, d)).astype(dtype) * 3 + 1 for _ in range(2))
    g, b = (rng.standard_normal(d).astype(dtype) for _ in range(2))
    y_ref, c_ref = REF.layernorm(*(a.astype(np.float64) for a in (x, g, b)), 1e-5)
    be = type(gpu)(np.dtype(dtype).name)
    poison()
    y, c = be.layernorm(cp.asarray(x), cp.asarray(g), cp.asarray(b), 1e-5)
    close(y, y_ref, dtype)
    # gradients are added into what is there: the residual stream's dx, the gain and bias
    # gradients (start them nonzero to check)
    dx0, dg0, db0 = (rng.standard_normal(s).astype(dtype) for s in ((n, d), d, d))
    refs = [a.astype(np.float64) for a in (dx0, dg0, db0)]
    REF.layernorm_backward(dy.astype(np.float64), c_ref, g.astype(np.float64), refs[1], refs[2],
                           dx=refs[0])
    poison()
    got = [cp.asarray(a) for a in (dx0, dg0, db0)]
    be.layernorm_backward(cp.asarray(dy), c, cp.asarray(g), got[1], got[2], dx=got[0])
    for a, ref in zip(got, refs, strict=True):
        close(a, ref, dtype)
    poison()                                   # without dx: a fresh gradient
    dg, db = cp.zeros(d, dtype), cp.zeros(d, dtype)
    fresh = be.layernorm_backward(cp.asarray(dy), c, cp.asarray(g), dg, db)
    close(fresh, REF.layernorm_backward(dy.astype(np.float64), c_ref, g.astype(np.float64),
                                        np.zeros(d), np.zeros(d)), dtype)


@pytest.mark.parametrize("inverse", [False, True])
def test_rope_kernel(gpu, inverse) -> None:
    rng = np.random.default_rng(7)
    lay = WindowLayout(5, 33)
    x = rng.standard_normal((lay.n_rows, 4, 16)).astype(np.float32)
    ref = REF.rope(x.astype(np.float64), *REF.rope_tables(lay, 16, 10000.0), inverse=inverse)
    poison()
    got = gpu.rope(cp.asarray(x), *gpu.rope_tables(lay, 16, 10000.0), inverse=inverse)
    close(got, ref, np.float32)


@pytest.mark.parametrize("v", [1, 65, 200])
def test_embedding_backward_kernel(gpu, v) -> None:
    rng = np.random.default_rng(v)
    n, d = 100_003, 48
    tok = rng.integers(0, v, n)
    src = rng.standard_normal((n, d)).astype(np.float32)
    dst = rng.standard_normal((v, d)).astype(np.float32)
    ref = dst.astype(np.float64)
    REF.scatter_add(ref, tok, src.astype(np.float64))
    got = cp.asarray(dst)
    gpu.scatter_add(got, cp.asarray(tok), cp.asarray(src))
    close(got, ref, np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n, cols", [(70_001, 96), (3, 256), (1, 8), (5_000, 30), (2_000, 2048)])
def test_relu_and_bias_kernels(gpu, dtype, n: int, cols: int) -> None:
    """Vectorised rows (96, 256, 8 columns), element rows (30 columns: not a whole number of
    16-byte vectors) and the CuPy fallback (2048: a row wider than a block)."""
    from agpt.gpu.backend import CupyBackend
    be = gpu if dtype == np.float32 else CupyBackend("float64")
    rng = np.random.default_rng(8 + n)
    f, dr, x = (rng.standard_normal((n, cols)).astype(dtype) for _ in range(3))
    b, db0 = (rng.standard_normal(cols).astype(dtype) for _ in range(2))
    f[::7] = -b                               # f + b == 0 exactly: relu's kink
    poison()
    r = be.bias_relu(cp.asarray(f), cp.asarray(b))
    r_ref = REF.bias_relu(f.astype(np.float64), b.astype(np.float64))
    close(r, r_ref, dtype)
    poison()
    close(be.add_bias(cp.asarray(x), cp.asarray(b)),
          REF.add_bias(x.astype(np.float64), b.astype(np.float64)), dtype)
    poison()
    close(be.relu_backward(cp.asarray(dr), r),
          REF.relu_backward(dr.astype(np.float64), r_ref), dtype)
    poison()
    db = cp.asarray(db0)
    df = be.relu_backward(cp.asarray(dr), r, db=db)
    db_ref = db0.astype(np.float64)
    close(df, REF.relu_backward(dr.astype(np.float64), r_ref, db=db_ref), dtype)
    close(db, db_ref, dtype)
    idx = rng.integers(0, n, 2 * n + 3)
    poison()
    close(be.gather_rows(cp.asarray(x), cp.asarray(idx)), REF.gather_rows(x.astype(np.float64), idx),
          dtype)
    buf = cp.empty(x.size + 1, dtype)          # a table one element off 16-byte alignment
    table = buf[1:].reshape(x.shape)
    table[...] = cp.asarray(x)
    poison()
    close(be.gather_rows(table, cp.asarray(idx)), REF.gather_rows(x.astype(np.float64), idx),
          dtype)


@pytest.mark.parametrize("n", [70_001, 4_000, 33, 1])
@pytest.mark.parametrize("d, f", [(64, 256), (32, 384), (64, 96)])
def test_thin_linear_kernels(gpu, n: int, d: int, f: int) -> None:
    """relu(x @ w1 + b1) and its backward in one pass (thin_gemm: 128 | f) against the
    reference, tails of a 32-row tile included; f = 96 takes the cuBLAS + row-kernel path."""
    from agpt.gpu import kernels
    rng = np.random.default_rng(n + f)
    x, dy = (rng.standard_normal((n, d)).astype(np.float32) for _ in range(2))
    w1, w2 = rng.standard_normal((d, f)).astype(np.float32), rng.standard_normal((f, d)).astype(np.float32)
    b1, db0 = (rng.standard_normal(f).astype(np.float32) for _ in range(2))
    x[::5, :] = 0                                 # rows at the kink: x @ w1 + b1 == b1
    b1[::3] = 0
    assert kernels.thin_applies(cp.asarray(x), cp.asarray(w1), False) == (f % 128 == 0)
    poison()
    r = gpu.linear_relu(cp.asarray(x), cp.asarray(w1), cp.asarray(b1))
    r_ref = REF.linear_relu(x.astype(np.float64), w1.astype(np.float64), b1.astype(np.float64))
    close(r, r_ref, np.float32)
    r_ref = cp.asnumpy(r).astype(np.float64)      # the same mask on both sides
    db, db_ref = cp.asarray(db0), db0.astype(np.float64)
    poison()
    df = gpu.relu_linear_backward(cp.asarray(dy), cp.asarray(w2), r, db)
    close(df, REF.relu_linear_backward(dy.astype(np.float64), w2.astype(np.float64), r_ref, db_ref),
          np.float32)
    close(db, db_ref, np.float32)


@pytest.mark.parametrize("n", [70_001, 129, 1])
@pytest.mark.parametrize("k, c", [(64, 64), (256, 64), (32, 128), (48, 192)])
def test_add_linear_kernel(gpu, n: int, k: int, c: int) -> None:
    """out += x @ w + b in one pass: the residual branches (wo: 64 -> 64, ff2: 256 -> 64),
    chunks of 64 inner columns (256), 8-byte column vectors (192)."""
    rng = np.random.default_rng(n + k + c)
    x = rng.standard_normal((n, k)).astype(np.float32)
    w = rng.standard_normal((k, c)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    out0 = rng.standard_normal((n, c)).astype(np.float32)
    poison()
    out = cp.asarray(out0)
    assert gpu.add_linear(out, cp.asarray(x), cp.asarray(w), cp.asarray(b)) is out
    ref = out0.astype(np.float64)
    REF.add_linear(ref, x.astype(np.float64), w.astype(np.float64), b.astype(np.float64))
    close(out, ref, np.float32)


@pytest.mark.parametrize("n", [70_001, 77, 1])
@pytest.mark.parametrize("d, h", [(64, 4), (64, 2), (128, 8)])
def test_qkv_projection_kernel(gpu, n: int, d: int, h: int) -> None:
    """q, k, v of one pass (product, bias, RoPE of adjacent pairs, split into heads)."""
    rng = np.random.default_rng(n + d + h)
    x = rng.standard_normal((n, d)).astype(np.float32)
    w = rng.standard_normal((d, 3 * d)).astype(np.float32) / 8
    b = rng.standard_normal(3 * d).astype(np.float32)
    lay = WindowLayout(max(1, n // 7), 7) if n % 7 == 0 else tree_layout(*random_forest(rng, n, 12))
    poison()
    got = gpu.qkv_projection(cp.asarray(x), cp.asarray(w), cp.asarray(b),
                             gpu.rope_tables(lay, d // h, 1e4), h)
    ref = REF.qkv_projection(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64),
                             REF.rope_tables(lay, d // h, 1e4), h)
    for g_, r_ in zip(got, ref, strict=True):
        assert g_.shape == r_.shape and g_.flags.c_contiguous
        close(g_, r_, np.float32)


def test_thin_linear_takes_the_models_products(gpu) -> None:
    """The micro preset's weights (views into the flat parameters) are aligned for the
    one-pass kernels, so training takes them, not the fallback."""
    from agpt.gpu import kernels
    from agpt.model.config import preset
    from agpt.model.params import init_params, views
    cfg = preset("micro", 65, 32)
    p = views(cp.asarray(init_params(cfg, np.random.default_rng(0))), cfg)
    x = cp.zeros((10, cfg.d_model), cp.float32)
    for i in range(cfg.n_layers):
        assert kernels.thin_applies(x, p[f"l{i}.ff1.w"], False, p[f"l{i}.ff1.b"])
        assert kernels.thin_applies(x, p[f"l{i}.ff2.w"], True)
        assert kernels.thin_applies(x, p[f"l{i}.wo.w"], False, p[f"l{i}.wo.b"], x)
        r = cp.zeros((10, cfg.d_ff), cp.float32)
        assert kernels.thin_applies(r, p[f"l{i}.ff2.w"], False, p[f"l{i}.ff2.b"], x)
        wqkv = cp.concatenate([p[f"l{i}.w{j}.w"] for j in "qkv"], axis=1)
        assert kernels.thin_applies(x, wqkv, False, cp.zeros(3 * cfg.d_model, cp.float32))


def test_sum_rows_kernel(gpu) -> None:
    rng = np.random.default_rng(9)
    dr = rng.standard_normal((70_001, 96)).astype(np.float32)
    for n in (1, 70_001, 5):            # the cached ones vector grows, then is sliced
        close(gpu.sum_rows(cp.asarray(dr[:n])), REF.sum_rows(dr[:n].astype(np.float64)),
              np.float32)
    acc = rng.standard_normal(96).astype(np.float32)
    got = cp.asarray(acc)
    gpu.sum_rows(cp.asarray(dr), out=got)
    close(got, REF.sum_rows(dr.astype(np.float64), out=acc.astype(np.float64)), np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
@pytest.mark.parametrize("acc", [False, True])
def test_gemm_strided_accumulate(gpu, dtype, ta, tb, acc) -> None:
    """matmul on cuBLAS against NumPy: transposes, accumulation, and operands that are column
    blocks of wider arrays (the q/k/v parts of the fused projection's gradient)."""
    rng = np.random.default_rng(int(ta) + 2 * int(tb) + 4 * int(acc))
    be = type(gpu)(np.dtype(dtype).name)
    m, k, n = 1037, 70, 48
    wide_a = rng.standard_normal((k, 3 * m) if ta else (m, 3 * k)).astype(dtype)
    wide_b = rng.standard_normal((n, 2 * k) if tb else (k, 2 * n)).astype(dtype)
    a = wide_a[:, m:2 * m] if ta else wide_a[:, k:2 * k]
    b = wide_b[:, :k] if tb else wide_b[:, n:]
    out0 = rng.standard_normal((m, 2 * n)).astype(dtype)
    ref = out0.astype(np.float64)
    REF.matmul(a.astype(np.float64), b.astype(np.float64), ta=ta, tb=tb, out=ref[:, :n], acc=acc)
    ga, gb = cp.asarray(wide_a), cp.asarray(wide_b)
    got = cp.asarray(out0)
    poison()
    be.matmul(ga[:, m:2 * m] if ta else ga[:, k:2 * k], gb[:, :k] if tb else gb[:, n:],
              ta=ta, tb=tb, out=got[:, :n], acc=acc)
    close(got, ref, dtype)                    # the right half of out is untouched
    fresh = be.matmul(cp.asarray(a), cp.asarray(b), ta=ta, tb=tb)
    close(fresh, REF.matmul(a.astype(np.float64), b.astype(np.float64), ta=ta, tb=tb), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_qkv_heads_kernels(gpu, dtype) -> None:
    """Bias + RoPE of the fused projection, and its backward (float64 dk/dv accepted)."""
    rng = np.random.default_rng(11)
    lay = WindowLayout(7, 33)
    n, h, e = lay.n_rows, 4, 16
    d = h * e
    be = type(gpu)(np.dtype(dtype).name)
    qkv = rng.standard_normal((n, 3 * d)).astype(dtype)
    bias = rng.standard_normal(3 * d).astype(dtype)
    refs = REF.qkv_heads(qkv.astype(np.float64), bias.astype(np.float64),
                         REF.rope_tables(lay, e, 10000.0), h)
    rope = be.rope_tables(lay, e, 10000.0)
    poison()
    for got, ref in zip(be.qkv_heads(cp.asarray(qkv), cp.asarray(bias), rope, h), refs,
                        strict=True):
        close(got, ref, dtype)
    dq, dk, dv = (rng.standard_normal((n, h, e)).astype(dtype) for _ in range(3))
    ref = REF.qkv_heads_backward(*(x.astype(np.float64) for x in (dq, dk, dv)),
                                 REF.rope_tables(lay, e, 10000.0))
    poison()
    close(be.qkv_heads_backward(cp.asarray(dq), cp.asarray(dk), cp.asarray(dv), rope), ref, dtype)
    poison()
    close(be.qkv_heads_backward(cp.asarray(dq), cp.asarray(dk, np.float64),
                                cp.asarray(dv, np.float64), rope), ref, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("v", [1, 65, 300])
def test_xent_counts_kernel(gpu, dtype, v) -> None:
    """Loss and logit gradient of count targets: rows with several targets, rows with none."""
    rng = np.random.default_rng(v)
    m = 5003
    logits = (rng.standard_normal((m, v)) * 4).astype(dtype)
    pairs = np.unique(np.stack([rng.integers(0, m, 3 * m), rng.integers(0, v, 3 * m)], 1), axis=0)
    row, token = pairs[:, 0], pairs[:, 1]
    coef = rng.uniform(0.1, 3, len(row)).astype(dtype)
    row_coef = np.bincount(row, coef, m).astype(dtype)
    loss_ref, d_ref = REF.xent_counts(logits.astype(np.float64), row, token,
                                      coef.astype(np.float64), row_coef.astype(np.float64))
    be = type(gpu)(np.dtype(dtype).name)
    poison()
    loss, d = be.xent_counts(*(cp.asarray(a) for a in (logits, row, token, coef, row_coef)))
    close(d, d_ref, dtype)
    scale = float(np.abs(row_coef).sum() * np.abs(logits).max()) + 1.0   # the loss is a
    assert abs(float(loss) - float(loss_ref)) <= TOL[dtype] * scale      # difference of sums


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name, extra", [("sgd", {}), ("sgd", {"weight_decay": 0.1}),
                                         ("momentum", {"weight_decay": 0.01, "clip": 0.5}),
                                         ("adam", {"weight_decay": 0.1}), ("adamw", {"clip": 1e3}),
                                         ("adamw", {"weight_decay": 0.05, "clip": 0.5}),
                                         ("rmsprop", {}), ("rmsprop", {"clip": 0.5}),
                                         ("rmsprop", {"bias_correction": True, "weight_decay": 0.1})])
def test_fused_optimizer_update(gpu, dtype, name: str, extra: dict) -> None:
    """CupyBackend.optimizer_update (two kernels) against Optimizer.update's generic array
    code over three updates (bias corrections depend on the step count): normalised by z,
    clipped (clip 0.5 binds, 1e3 does not), stepped, gradient zeroed; same stats (flag,
    norm, loss)."""
    from agpt.train.optim import OptimConfig, Optimizer
    rng = np.random.default_rng(len(name))
    p0 = rng.standard_normal(100_003).astype(dtype)
    cfg = OptimConfig(name, lr=3e-3, beta2=0.99, **extra)
    ref = Optimizer(cfg, cp, cp.asarray(p0))
    fused = Optimizer(cfg, cp, cp.asarray(p0), fused=gpu.optimizer_update)
    pr, pf = cp.asarray(p0), cp.asarray(p0)
    tol = 1e-6 if dtype == np.float32 else 1e-13
    for z in (2.5, 1.0, 0.3):
        g = rng.standard_normal(p0.size).astype(dtype) * 0.01
        gr, gf = cp.asarray(g), cp.asarray(g)
        loss = cp.asarray(1.5, dtype)
        ok_r, n_r, l_r = cp.asnumpy(ref.update(pr, gr, z, loss, 3e-3))
        ok_f, n_f, l_f = cp.asnumpy(fused.update(pf, gf, z, loss, 3e-3))
        assert ok_r == ok_f == 1.0 and l_r == l_f == 1.5 and fused.t == ref.t
        # the norm is summed in double precision here, in the array type there
        assert abs(float(n_f) - float(n_r)) <= (1e-5 if dtype == np.float32 else 1e-12) * float(n_r)
        assert not gf.any() and not gr.any()
    # FMA contraction changes roundings: a few ulps of the operands (|g| ~ 1), which is more
    # than a few ulps of a momentum that cancels to ~0
    np.testing.assert_allclose(cp.asnumpy(pf), cp.asnumpy(pr), rtol=tol, atol=tol)
    for k in ref.slots:
        np.testing.assert_allclose(cp.asnumpy(fused.slots[k]), cp.asnumpy(ref.slots[k]),
                                   rtol=tol, atol=tol)
    # a NaN/Inf in the gradient or the loss clears the flag, as in the reference
    for bad_g, bad_loss in ((np.nan, 1.0), (np.inf, 1.0), (0.0, np.inf), (0.0, np.nan)):
        g = np.zeros(p0.size, dtype)
        g[7] = bad_g
        for opt in (fused, ref):
            st = opt.update(cp.asarray(p0), cp.asarray(g), 1.0, cp.asarray(bad_loss, dtype), 3e-3)
            assert float(st[0]) == 0.0
