"""An independent, deliberately plain µGPT for one context (SPEC §7), for the tests.

It shares nothing with agpt.model.gpt but the parameter names: one sequence, a Python loop
over positions and heads, float64. `frozen` supplies, per layer, K/V of the earlier positions
to use as constants (the seed's truncated-gradient rule).
"""

from __future__ import annotations

import numpy as np

from agpt.model.config import ModelConfig
from agpt.model.params import views


def _ln(x, g, b, eps):
    mu = x.mean()
    var = ((x - mu) ** 2).mean()
    return (x - mu) / np.sqrt(var + eps) * g + b


def _rope(x, pos, base):
    out = x.copy()
    e = len(x)
    for m in range(e // 2):
        th = pos * base ** (-2 * m / e)
        c, s = np.cos(th), np.sin(th)
        out[2 * m] = x[2 * m] * c - x[2 * m + 1] * s
        out[2 * m + 1] = x[2 * m] * s + x[2 * m + 1] * c
    return out


def context_kv_and_logits(cfg: ModelConfig, flat, tokens, frozen=None):
    """Logits at every position of `tokens`, and per layer the (K, V) of every position."""
    p = views(np.asarray(flat, dtype=np.float64), cfg)
    h, e = cfg.n_heads, cfg.head_dim
    xs = [p["tok_emb"][t].copy() for t in tokens]
    kv = []
    for li in range(cfg.n_layers):
        w = {k[len(f"l{li}."):]: v for k, v in p.items() if k.startswith(f"l{li}.")}
        qs, ks, vs = [], [], []
        for pos, x in enumerate(xs):
            a = _ln(x, w["ln1.g"], w["ln1.b"], cfg.ln_eps)
            q, k, v = a @ w["wq.w"] + w["wq.b"], a @ w["wk.w"] + w["wk.b"], a @ w["wv.w"] + w["wv.b"]
            qs.append(np.concatenate([_rope(q[i * e:(i + 1) * e], pos, cfg.rope_base) for i in range(h)]))
            ks.append(np.concatenate([_rope(k[i * e:(i + 1) * e], pos, cfg.rope_base) for i in range(h)]))
            vs.append(v)
        if frozen is not None:
            fk, fv = frozen[li]
            ks = [fk[i] if i < len(xs) - 1 else ks[i] for i in range(len(xs))]
            vs = [fv[i] if i < len(xs) - 1 else vs[i] for i in range(len(xs))]
        kv.append((ks, vs))
        new = []
        for t, x in enumerate(xs):
            o = np.zeros(cfg.d_model)
            for i in range(h):
                sl = slice(i * e, (i + 1) * e)
                sc = np.array([qs[t][sl] @ ks[j][sl] for j in range(t + 1)]) / np.sqrt(e)
                pr = np.exp(sc - sc.max())
                pr /= pr.sum()
                o[sl] = sum(pr[j] * vs[j][sl] for j in range(t + 1))
            x = x + o @ w["wo.w"] + w["wo.b"]
            b = _ln(x, w["ln2.g"], w["ln2.b"], cfg.ln_eps)
            x = x + np.maximum(b @ w["ff1.w"] + w["ff1.b"], 0) @ w["ff2.w"] + w["ff2.b"]
            new.append(x)
        xs = new
    logits = [(_ln(x, p["lnf.g"], p["lnf.b"], cfg.ln_eps) @ p["out.w"] + p["out.b"]) for x in xs]
    return kv, logits


def log_probs(cfg: ModelConfig, flat, tokens, frozen=None) -> np.ndarray:
    """log softmax at the last position of `tokens`."""
    _, logits = context_kv_and_logits(cfg, flat, tokens, frozen)
    z = logits[-1]
    return z - (np.log(np.exp(z - z.max()).sum()) + z.max())
