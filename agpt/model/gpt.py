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

    rows: Any       # (M,) rows that carry loss
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


def forward(cfg: ModelConfig, be, flat: Any, batch: Batch, keep: bool = False):
    """Final hidden states (after LNf) of every row; with keep, also what backward needs."""
    p = views(flat, cfg)
    n, h, e = len(batch.tokens), cfg.n_heads, cfg.head_dim
    attend, _ = _attention(be, batch.layout)
    cos, sin = be.rope_tables(batch.layout, e, cfg.rope_base)
    x = p["tok_emb"][batch.tokens]
    saved = []
    for i in range(cfg.n_layers):
        w = _layer(p, i).__getitem__
        a, c1 = be.layernorm(x, w("ln1.g"), w("ln1.b"), cfg.ln_eps)
        q = be.rope((a @ w("wq.w") + w("wq.b")).reshape(n, h, e), cos, sin)
        k = be.rope((a @ w("wk.w") + w("wk.b")).reshape(n, h, e), cos, sin)
        v = (a @ w("wv.w") + w("wv.b")).reshape(n, h, e)
        o, att = attend(q, k, v, batch.layout)
        o = o.reshape(n, cfg.d_model)
        x = x + o @ w("wo.w") + w("wo.b")
        b_, c2 = be.layernorm(x, w("ln2.g"), w("ln2.b"), cfg.ln_eps)
        f = b_ @ w("ff1.w") + w("ff1.b")
        r = be.relu(f)
        x = x + r @ w("ff2.w") + w("ff2.b")
        if keep:
            saved.append((a, c1, q, k, v, att, o, b_, c2, f, r))
    y, cf = be.layernorm(x, p["lnf.g"], p["lnf.b"], cfg.ln_eps)
    return y, (saved, cf, cos, sin)


def logits_of(cfg: ModelConfig, flat: Any, y: Any) -> Any:
    p = views(flat, cfg)
    return y @ p["out.w"] + p["out.b"]


def loss_and_grad(cfg: ModelConfig, be, flat: Any, batch: Batch, grad: Any | None,
                  truncated: bool = False) -> float:
    """Summed weighted NLL of the batch's targets; adds its gradient into `grad` (flat)."""
    t = batch.targets
    assert t is not None
    y, (saved, cf, cos, sin) = forward(cfg, be, flat, batch, keep=grad is not None)
    ys = y[t.rows]
    logits = logits_of(cfg, flat, ys)
    loss, dlogits = be.xent_counts(logits, t.row, t.token, t.coef, t.row_coef)
    if grad is None:
        return loss
    p, g = views(flat, cfg), views(grad, cfg)
    n, h, e = len(batch.tokens), cfg.n_heads, cfg.head_dim
    _, attend_back = _attention(be, batch.layout)
    g["out.w"] += ys.T @ dlogits
    g["out.b"] += be.sum_rows(dlogits)
    dy = be.xp.zeros_like(y)
    dy[t.rows] = dlogits @ p["out.w"].T            # rows are unique
    dx, dg, db = be.layernorm_backward(dy, cf, p["lnf.g"])
    g["lnf.g"] += dg
    g["lnf.b"] += db
    for i in reversed(range(cfg.n_layers)):
        w, gw = _layer(p, i).__getitem__, _layer(g, i).__getitem__
        a, c1, q, k, v, att, o, b_, c2, f, r = saved[i]
        # FFN
        gw("ff2.w")[...] += r.T @ dx
        gw("ff2.b")[...] += be.sum_rows(dx)
        df = be.relu_backward(dx @ w("ff2.w").T, f)
        gw("ff1.w")[...] += b_.T @ df
        gw("ff1.b")[...] += be.sum_rows(df)
        dxl, dg, db = be.layernorm_backward(df @ w("ff1.w").T, c2, w("ln2.g"))
        gw("ln2.g")[...] += dg
        gw("ln2.b")[...] += db
        dx = dx + dxl
        # attention
        gw("wo.w")[...] += o.T @ dx
        gw("wo.b")[...] += be.sum_rows(dx)
        do = (dx @ w("wo.w").T).reshape(n, h, e)
        dq, dk, dv = attend_back(do, q, k, v, att, batch.layout, truncated)
        dq = be.rope(dq, cos, sin, inverse=True).reshape(n, -1)
        dk = be.rope(dk, cos, sin, inverse=True).reshape(n, -1)
        dv = dv.reshape(n, -1)
        da = dq @ w("wq.w").T + dk @ w("wk.w").T + dv @ w("wv.w").T
        for m, dm in (("wq", dq), ("wk", dk), ("wv", dv)):
            gw(m + ".w")[...] += a.T @ dm
            gw(m + ".b")[...] += be.sum_rows(dm)
        dxl, dg, db = be.layernorm_backward(da, c1, w("ln1.g"))
        gw("ln1.g")[...] += dg
        gw("ln1.b")[...] += db
        dx = dx + dxl
    be.scatter_add(g["tok_emb"], batch.tokens, dx)   # repeated tokens sum
    return loss
