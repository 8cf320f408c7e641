"""µGPT over rows: the whole model, forward and hand-written backward, on any backend.

A "row" is one context position: its token, its position (context length - 1) and, through
the layout, the rows it attends to. The same code trains on a trie unit (TreeLayout) and on
windows (WindowLayout); evaluation and sampling use windows.

    x = tok_emb[token]
    per layer:  x += Wo·attn(rope(Wq·LN1(x)), rope(Wk·LN1(x)), Wv·LN1(x)) ;  x += W2·relu(W1·LN2(x))
    logits = Wout·LNf(x)       (every matrix: y = x·W + b)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agpt.model.config import ModelConfig
from agpt.model.layout import Layout, WindowLayout
from agpt.model.params import views


@dataclass
class Targets:
    """Loss terms: coef_k * -log p(token_k | row_k); only rows in `rows` get an output head."""

    rows: Any       # (M,) rows that carry loss, or a slice when they are one contiguous range
    row: Any        # (K,) index into `rows`
    token: Any      # (K,)
    coef: Any       # (K,) weight * count
    row_coef: Any   # (M,) sum of coef per row


@dataclass
class Batch:
    """Everything one forward/backward needs, already on the backend's device."""

    tokens: Any
    layout: Layout
    targets: Targets | None = None


def _layer(p: dict[str, Any], i: int) -> dict[str, Any]:
    """Layer i's tensors under their short names ("wq.w", "ln1.g", ...)."""
    pre = f"l{i}."
    return {k[len(pre):]: v for k, v in p.items() if k.startswith(pre)}


def _attention(be, layout: Layout):
    if isinstance(layout, WindowLayout):
        return be.window_attention, be.window_attention_backward
    return be.tree_attention, be.tree_attention_backward


def _qkv(be, w) -> tuple[Any, Any]:
    """The q, k, v projections side by side, (d, 3d) and (3d,): one product instead of three."""
    xp = be.xp
    return (xp.concatenate([w("wq.w"), w("wk.w"), w("wv.w")], axis=1),
            xp.concatenate([w("wq.b"), w("wk.b"), w("wv.b")]))


def forward(cfg: ModelConfig, be, flat: Any, batch: Batch, keep: bool = False):
    """Final hidden states (after LNf) of every row; with keep, also what backward needs."""
    p = views(flat, cfg)
    n, h = len(batch.tokens), cfg.n_heads
    attend, _ = _attention(be, batch.layout)
    rope = be.rope_tables(batch.layout, cfg.head_dim, cfg.rope_base)
    x = be.gather_rows(p["tok_emb"], batch.tokens)
    saved = []
    for i in range(cfg.n_layers):
        w = _layer(p, i).__getitem__
        wqkv, bqkv = _qkv(be, w)
        a, c1 = be.layernorm(x, w("ln1.g"), w("ln1.b"), cfg.ln_eps)
        q, k, v = be.qkv_projection(a, wqkv, bqkv, rope, h)
        o, att = attend(q, k, v, batch.layout)
        o = o.reshape(n, cfg.d_model)
        be.add_linear(x, o, w("wo.w"), w("wo.b"))   # the residual stream is updated in place:
                                                    # x itself is never saved
        b_, c2 = be.layernorm(x, w("ln2.g"), w("ln2.b"), cfg.ln_eps)
        r = be.linear_relu(b_, w("ff1.w"), w("ff1.b"))
        be.add_linear(x, r, w("ff2.w"), w("ff2.b"))
        if keep:
            saved.append((a, c1, wqkv, q, k, v, att, o, b_, c2, r))
    y, cf = be.layernorm(x, p["lnf.g"], p["lnf.b"], cfg.ln_eps)
    return y, (saved, cf, rope)


def logits_of(cfg: ModelConfig, be, flat: Any, y: Any) -> Any:
    p = views(flat, cfg)
    return be.add_bias(be.matmul(y, p["out.w"]), p["out.b"])


def loss_and_grad(cfg: ModelConfig, be, flat: Any, batch: Batch, grad: Any | None,
                  truncated: bool = False) -> float:
    """Summed weighted NLL of the batch's targets; adds its gradient into `grad` (flat).
    Every parameter gradient is accumulated in place (`be.matmul(..., acc=True)`)."""
    t = batch.targets
    assert t is not None
    y, (saved, cf, rope) = forward(cfg, be, flat, batch, keep=grad is not None)
    ys = y[t.rows]
    logits = logits_of(cfg, be, flat, ys)
    loss, dlogits = be.xent_counts(logits, t.row, t.token, t.coef, t.row_coef)
    if grad is None:
        return loss
    p, g = views(flat, cfg), views(grad, cfg)
    n, h, e, d = len(batch.tokens), cfg.n_heads, cfg.head_dim, cfg.d_model
    _, attend_back = _attention(be, batch.layout)
    mm = be.matmul
    mm(ys, dlogits, ta=True, out=g["out.w"], acc=True)
    be.sum_rows(dlogits, out=g["out.b"])
    if isinstance(t.rows, slice):          # a trie unit: every row but its context carries loss
        dy = be.xp.empty_like(y)
        dy[:t.rows.start] = 0
        dy[t.rows.stop:] = 0
        mm(dlogits, p["out.w"], tb=True, out=dy[t.rows])
    else:
        dy = be.xp.zeros_like(y)
        dy[t.rows] = mm(dlogits, p["out.w"], tb=True)      # rows are unique
    dx = be.layernorm_backward(dy, cf, p["lnf.g"], g["lnf.g"], g["lnf.b"])
    for i in reversed(range(cfg.n_layers)):
        w, gw = _layer(p, i).__getitem__, _layer(g, i).__getitem__
        a, c1, wqkv, q, k, v, att, o, b_, c2, r = saved[i]
        # FFN (dx is the residual stream's gradient; the LayerNorm backward adds into it)
        mm(r, dx, ta=True, out=gw("ff2.w"), acc=True)
        be.sum_rows(dx, out=gw("ff2.b"))
        df = be.relu_linear_backward(dx, w("ff2.w"), r, db=gw("ff1.b"))
        mm(b_, df, ta=True, out=gw("ff1.w"), acc=True)
        be.layernorm_backward(mm(df, w("ff1.w"), tb=True), c2, w("ln2.g"), gw("ln2.g"),
                              gw("ln2.b"), dx=dx)
        # attention
        mm(o, dx, ta=True, out=gw("wo.w"), acc=True)
        be.sum_rows(dx, out=gw("wo.b"))
        do = mm(dx, w("wo.w"), tb=True).reshape(n, h, e)
        dqkv = be.qkv_heads_backward(*attend_back(do, q, k, v, att, batch.layout, truncated),
                                     rope)
        # one product and one row sum for the three (a thin product over all N rows costs
        # about as much as a wide one), then split into the three gradients
        dw, db = mm(a, dqkv, ta=True), be.sum_rows(dqkv)
        for j, m in enumerate(("wq", "wk", "wv")):
            gw(m + ".w")[...] += dw[:, j * d:(j + 1) * d]
            gw(m + ".b")[...] += db[j * d:(j + 1) * d]
        be.layernorm_backward(mm(dqkv, wqkv, tb=True), c1, w("ln1.g"), gw("ln1.g"),
                              gw("ln1.b"), dx=dx)
    be.scatter_add(g["tok_emb"], batch.tokens, dx)   # repeated tokens sum
    return loss
