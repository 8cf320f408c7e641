"""The NumPy reference backend: every model operation in plain, vectorised NumPy.

Each method is one "kernel" of the model, written against `self.xp` so that the CuPy backend
(agpt/gpu/backend.py) runs the same code on the GPU and overrides methods one by one with
kernels, each tested against the method here. Shapes: rows N, heads H, head size E,
ancestors Dm.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np

from agpt.model.layout import TreeLayout, WindowLayout, tree_layout


class NumpyBackend:
    name = "numpy"
    xp = np
    #: rows per trie chunk that keep the ancestor gathers in cache (measured: 2-4K rows run
    #: ~1.5x faster than 32K on the 2-core machine); chunking never changes the math
    chunk_rows = 4096

    def __init__(self, dtype: Any = "float32"):
        self.dtype = np.dtype(dtype)

    # -- transfers ------------------------------------------------------------------------
    def asarray(self, a: Any, dtype: Any = None) -> np.ndarray:
        return np.asarray(a, dtype=dtype)

    def asarrays(self, arrays: list[np.ndarray]) -> list[Any]:
        """Host arrays on the device, dtypes kept (the GPU uploads them together)."""
        return [self.asarray(a) for a in arrays]

    def to_host(self, a: Any) -> np.ndarray:
        return np.asarray(a)

    def copy_arrays(self, dst: list[Any], src: list[Any]) -> None:
        """Each array of src into the one of dst (same shapes and dtypes)."""
        for d, s in zip(dst, src, strict=True):
            d[...] = s

    def fetch(self, a: Any) -> tuple[np.ndarray, Any]:
        """(host copy, event after it: None when it is ready already, as here)."""
        return np.asarray(a), None

    def prepare(self, layout: Any) -> Any:
        """Move a layout's index arrays to the device (identity on the CPU)."""
        return layout

    def tree_layout(self, parent: np.ndarray, depth: np.ndarray, max_depth: int | None = None,
                    fixed: bool = False, tiles: Any = None) -> Any:
        """The layout of a trie unit's rows (validated depth-first preorder), for contexts up to
        `max_depth` (default: the deepest row's). `fixed`: its arrays' shapes depend on the
        number of rows and max_depth alone (padded on the GPU; see CupyBackend). `tiles`: the
        GPU kernels' tile layout, if the caller made it already (unused here)."""
        return tree_layout(parent, depth, max_depth)

    def staged(self) -> AbstractContextManager:
        """Uploads made inside are complete on exit (the GPU stages them through pinned memory)."""
        return nullcontext()

    def bytes_per_row(self, cfg: Any, depth: int) -> int:
        """Peak activation bytes per trie row: saved activations per layer, the gathered
        ancestor K/V and their gradient contributions, logits."""
        d, f, h = cfg.d_model, cfg.d_ff, cfg.n_heads
        per_layer = 9 * d + 2 * f + h * depth + 2
        transient = 6 * depth * d + 3 * h * depth
        return self.dtype.itemsize * (cfg.n_layers * per_layer + transient + 3 * cfg.vocab_size
                                      + 4 * d) + 64

    def synchronize(self) -> None:
        pass

    # -- matrix products and small pieces --------------------------------------------------
    def matmul(self, a: np.ndarray, b: np.ndarray, *, ta: bool = False, tb: bool = False,
               out: np.ndarray | None = None, acc: bool = False) -> np.ndarray:
        """op(a) @ op(b) (op transposes when ta / tb); written into `out`, or added to it (acc):
        gradients and residuals accumulate in place, with no temporary on the GPU."""
        r = (a.T if ta else a) @ (b.T if tb else b)
        if out is None:
            return r
        if acc:
            out += r
        else:
            out[...] = r
        return out

    def sum_rows(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """x.sum(0), the gradient of a bias added to every row; added into `out` if given."""
        if out is None:
            return x.sum(0)
        out += x.sum(0)
        return out

    def bias_relu(self, f: np.ndarray, b: np.ndarray) -> np.ndarray:
        """relu(f + b) (f may be overwritten): the FFN's first activation, saved for the
        backward instead of f, since r > 0 exactly where f + b > 0."""
        f += b
        return self.xp.maximum(f, 0, out=f)

    def relu_backward(self, dr: np.ndarray, r: np.ndarray, db: np.ndarray | None = None) -> np.ndarray:
        """dL/df from dL/dr for r = relu(f), masked by the output r (dr may be overwritten);
        with db, also adds the bias gradient df.sum(0) into it."""
        df = dr * (r > 0)
        if db is not None:
            self.sum_rows(df, out=db)
        return df

    def linear_relu(self, x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
        """relu(x @ w + b): the FFN's first layer (its output is what the backward keeps)."""
        return self.bias_relu(self.matmul(x, w), b)

    def add_linear(self, out: np.ndarray, x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
        """out += x @ w + b in place: a residual branch (attention output, FFN second layer)."""
        self.matmul(x, w, out=out, acc=True)
        return self.add_bias(out, b)

    def relu_linear_backward(self, dy: np.ndarray, w: np.ndarray, r: np.ndarray,
                             db: np.ndarray) -> np.ndarray:
        """(dy @ w.T) masked by r > 0: the gradient at the pre-activation of r = relu(f + b)
        from dy, the gradient at r @ w (w: the next layer's weight). Adds its column sums,
        the gradient of b, into db."""
        return self.relu_backward(self.matmul(dy, w, tb=True), r, db=db)

    def gather_rows(self, table: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """table[idx]: the token embeddings of a batch."""
        return table[idx]

    def add_bias(self, x: np.ndarray, b: np.ndarray) -> np.ndarray:
        """x += b over every row, in place (the residual stream's and the logits' biases)."""
        x += b
        return x

    # -- layer norm -----------------------------------------------------------------------
    def layernorm(self, x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float):
        mu = x.mean(-1, keepdims=True)
        xc = x - mu
        rstd = 1.0 / self.xp.sqrt((xc * xc).mean(-1, keepdims=True) + eps)
        xhat = xc * rstd
        return xhat * g + b, (xhat, rstd)

    def layernorm_backward(self, dy: np.ndarray, cache: tuple, g: np.ndarray, dg: np.ndarray,
                           db: np.ndarray, dx: np.ndarray | None = None) -> np.ndarray:
        """dL/dx, added into `dx` when given (the residual stream's gradient); the gain and
        bias gradients are added into dg and db."""
        xhat, rstd = cache
        dg += (dy * xhat).sum(0)
        db += dy.sum(0)
        dxh = dy * g
        d = rstd * (dxh - dxh.mean(-1, keepdims=True)
                    - xhat * (dxh * xhat).mean(-1, keepdims=True))
        if dx is None:
            return d
        dx += d
        return dx

    # -- rotary position encoding (adjacent pairs) ----------------------------------------
    def rope_tables(self, layout: Any, head_dim: int, base: float):
        """cos and sin of pos * theta_m for each row of the layout, (N, 1, E/2)."""
        inv = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        ang = np.arange(layout.max_pos + 1, dtype=np.float64)[:, None] * inv[None, :]
        pos = self.asarray(layout.pos)
        return (self.asarray(np.cos(ang), self.dtype)[pos][:, None, :],
                self.asarray(np.sin(ang), self.dtype)[pos][:, None, :])

    def rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, inverse: bool = False):
        """Rotate pairs (x[2m], x[2m+1]) of each head by pos*theta_m (by minus that if inverse)."""
        if inverse:
            sin = -sin
        a, b = x[..., 0::2], x[..., 1::2]
        out = self.xp.empty_like(x)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out

    def qkv_heads(self, qkv: np.ndarray, bias: np.ndarray, rope: tuple, n_heads: int):
        """q, k, v (N, H, E) from the fused projection qkv (N, 3d): bias added, q and k rotated."""
        n, d = qkv.shape[0], qkv.shape[1] // 3
        x = qkv + bias
        q, k, v = (x[:, j * d:(j + 1) * d].reshape(n, n_heads, -1) for j in range(3))
        return self.rope(q, *rope), self.rope(k, *rope), self.xp.ascontiguousarray(v)

    def qkv_projection(self, x: np.ndarray, w: np.ndarray, b: np.ndarray, rope: tuple,
                       n_heads: int):
        """q, k, v (N, H, E) of x: one product with the (d, 3d) weight [Wq Wk Wv], then
        qkv_heads (bias, RoPE on q and k)."""
        return self.qkv_heads(self.matmul(x, w), b, rope, n_heads)

    def qkv_heads_backward(self, dq: np.ndarray, dk: np.ndarray, dv: np.ndarray,
                           rope: tuple) -> np.ndarray:
        """d qkv (N, 3d) from the gradients of q, k, v (N, H, E): the rotations undone."""
        n = dq.shape[0]
        parts = (self.rope(dq, *rope, inverse=True), self.rope(dk, *rope, inverse=True), dv)
        return self.xp.concatenate([x.reshape(n, -1).astype(self.dtype, copy=False)
                                    for x in parts], axis=1)

    # -- attention over a trie unit --------------------------------------------------------
    def tree_attention(self, q, k, v, tree: TreeLayout):
        """o_i = softmax_j(q_i . k_anc(i,j) / sqrt(E)) v_anc(i,j) over i's ancestors and i."""
        xp = self.xp
        scale = q.shape[-1] ** -0.5       # a Python float: keeps fp32 arrays fp32
        mask = xp.arange(tree.max_depth)[None, :] < tree.depth[:, None]      # (N, Dm)
        kg = k[tree.anc].transpose(0, 2, 1, 3)                                # (N, H, Dm, E)
        s = xp.matmul(kg, q[..., None])[..., 0] * scale                       # (N, H, Dm)
        s = xp.where(mask[:, None, :], s, -xp.inf)
        p = xp.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        vg = v[tree.anc].transpose(0, 2, 1, 3)
        return xp.matmul(p[:, :, None, :], vg)[:, :, 0, :], p

    def tree_attention_backward(self, do, q, k, v, p, tree: TreeLayout, truncated: bool = False):
        """(dq, dk, dv). dk/dv of a row sum the contributions of all its descendants (exact),
        or only its own (truncated: ancestors' K/V treated as constants, the seed's rule)."""
        xp = self.xp
        scale = q.shape[-1] ** -0.5       # a Python float: keeps fp32 arrays fp32
        vg = v[tree.anc].transpose(0, 2, 1, 3)
        dp = xp.matmul(vg, do[..., None])[..., 0]                             # (N, H, Dm)
        ds = p * (dp - (p * dp).sum(-1, keepdims=True))
        kg = k[tree.anc].transpose(0, 2, 1, 3)
        dq = xp.matmul(ds[:, :, None, :], kg)[:, :, 0, :] * scale
        if truncated:
            own = (xp.arange(tree.n_rows), slice(None), tree.depth - 1)
            return dq, ds[own][..., None] * q * scale, p[own][..., None] * do
        return dq, self.aggregate(ds, q, tree) * scale, self.aggregate(p, do, tree)

    def aggregate(self, w: np.ndarray, x: np.ndarray, tree: TreeLayout) -> np.ndarray:
        """out[r] = sum over r's subtree rows i of w[i, :, depth(r)-1] * x[i]  (r included).

        In preorder the subtree of a depth-(j+1) row r is the contiguous range from r to the
        next depth-(j+1) row, minus shallower rows, whose w[:, :, j] is 0 (masked). So each
        depth is one segmented sum (reduceat) over contiguous rows: no scatter, no atomics."""
        n = tree.n_rows
        out = self.xp.empty((n, x.shape[1] * x.shape[2]), dtype=x.dtype)
        for j, (st, a) in enumerate(zip(tree.level, tree.first, strict=True)):
            if a < 0:
                continue
            y = (w[a:, :, j, None] * x[a:]).reshape(n - a, -1)
            out[st] = self.segment_sum(y, st - a)
        return out.reshape(x.shape)

    def segment_sum(self, y: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """Sums of y's rows over [starts[k], starts[k+1]) (the last to the end); starts ascending."""
        return np.add.reduceat(y, starts, axis=0)

    def scatter_add(self, dst: np.ndarray, idx: np.ndarray, src: np.ndarray) -> None:
        """dst[idx] += src, repeated indices summed."""
        np.add.at(dst, idx, src)

    # -- attention over windows ------------------------------------------------------------
    def window_attention(self, q, k, v, win: WindowLayout):
        b, t = win.batch, win.length
        h, e = q.shape[1:]
        qb, kb, vb = (x.reshape(b, t, h, e).transpose(0, 2, 1, 3) for x in (q, k, v))
        xp = self.xp
        s = (qb @ kb.transpose(0, 1, 3, 2)) * e ** -0.5
        s = xp.where(xp.tri(t, dtype=bool), s, -xp.inf)
        p = xp.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return (p @ vb).transpose(0, 2, 1, 3).reshape(b * t, h, e), p

    def window_attention_backward(self, do, q, k, v, p, win: WindowLayout, truncated: bool = False):
        b, t = win.batch, win.length
        h, e = q.shape[1:]
        qb, kb, vb, dob = (x.reshape(b, t, h, e).transpose(0, 2, 1, 3) for x in (q, k, v, do))
        dp = dob @ vb.transpose(0, 1, 3, 2)
        ds = p * (dp - (p * dp).sum(-1, keepdims=True)) * e ** -0.5
        if truncated:  # keys and values of earlier positions are constants
            eye = self.xp.eye(t, dtype=bool)
            dv = (p * eye).sum(-1)[..., None] * dob
            dk = (ds * eye).sum(-1)[..., None] * qb
        else:
            dv = p.transpose(0, 1, 3, 2) @ dob
            dk = ds.transpose(0, 1, 3, 2) @ qb
        dq = ds @ kb
        back = lambda x: x.transpose(0, 2, 1, 3).reshape(b * t, h, e)  # noqa: E731
        return back(dq), back(dk), back(dv)

    # -- loss with count targets ------------------------------------------------------------
    def xent_counts(self, logits, row, token, coef, row_coef):
        """sum_k coef_k * -log softmax(logits)[row_k, token_k], and its gradient.

        row_coef[i] = sum of coef over row i's targets (precomputed on the host)."""
        m = logits.max(-1, keepdims=True)
        e = self.xp.exp(logits - m)
        z = e.sum(-1, keepdims=True)
        lse = (self.xp.log(z) + m)[:, 0]
        # a 0-d array, not a float: on the GPU reading it would sync every chunk
        loss = (row_coef * lse).sum() - (coef * logits[row, token]).sum()
        d = e * (row_coef[:, None] / z)
        d[row, token] -= coef      # (row, token) pairs are unique
        return loss, d
