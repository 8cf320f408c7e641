"""Autoregressive sampling from a model (`agpt sample`, SPEC §8 "Evaluation")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from agpt.errors import AgptError
from agpt.model.config import ModelConfig
from agpt.model.gpt import Batch, forward, logits_of
from agpt.model.layout import WindowLayout
from agpt.tokenize import Tokenizer


def default_prompt(tok: Tokenizer) -> np.ndarray:
    """A newline where the vocabulary has one, else its first symbol."""
    nl = tok.vocab.index(10) if 10 in tok.vocab else 0
    return np.array([nl], dtype=np.int64)


def next_token(logits: np.ndarray, temperature: float, top_k: int,
               rng: np.random.Generator) -> int:
    """Pick from one row of logits: greedy at temperature 0, else softmax(logits / T) over the
    top_k largest (all when top_k is 0)."""
    z = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        return int(np.argmax(z))
    if 0 < top_k < len(z):
        keep = np.argpartition(-z, top_k - 1)[:top_k]
        masked = np.full_like(z, -np.inf)
        masked[keep] = z[keep]
        z = masked
    z = (z - z.max()) / temperature
    p = np.exp(z)
    p /= p.sum()
    return int(rng.choice(len(p), p=p))


def sample(cfg: ModelConfig, be: Any, flat: Any, prompt: Sequence[int] | np.ndarray,
           length: int = 200, temperature: float = 1.0, top_k: int = 0,
           seed: int = 0) -> np.ndarray:
    """`length` new token ids after `prompt`, each predicted from the last cfg.context tokens.

    Deterministic for a fixed seed (the draws use a NumPy generator on the host)."""
    if length < 0:
        raise AgptError(f"--length must be >= 0, got {length}")
    if not temperature >= 0 or not np.isfinite(temperature):
        raise AgptError(f"--temperature must be a finite number >= 0, got {temperature}")
    if top_k < 0:
        raise AgptError(f"--top-k must be >= 0 (0 = no limit), got {top_k}")
    ids = [int(i) for i in np.asarray(prompt).reshape(-1)]
    if not ids:
        raise AgptError("the prompt is empty: give at least one symbol")
    if max(ids) >= cfg.vocab_size or min(ids) < 0:
        raise AgptError(f"prompt token ids must lie in [0, {cfg.vocab_size})")
    rng = np.random.default_rng(seed)
    w = be.asarray(flat, be.dtype)
    out: list[int] = []
    for _ in range(length):
        ctx = (ids + out)[-cfg.context:]
        t = len(ctx)
        batch = Batch(be.asarray(np.asarray(ctx, np.int64)), be.prepare(WindowLayout(1, t)))
        y, _ = forward(cfg, be, w, batch)
        logits = be.to_host(logits_of(cfg, be, w, y[t - 1:t]))[0]
        if not np.all(np.isfinite(logits)):
            raise AgptError("the model produced NaN/Inf logits: the checkpoint's weights are "
                            "not finite")
        out.append(next_token(logits, temperature, top_k, rng))
    return np.asarray(out, dtype=np.int64)
