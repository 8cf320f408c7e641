"""Perplexity of a model on a token stream with a sliding window (SPEC §8 "Evaluation").

A *plan* lists the windows to run: window i reads tokens[start_i : start_i + length_i] and
scores its positions first_i .. length_i - 1 (position p predicts token start_i + p + 1, from
the p + 1 tokens before it). Windows of one length are batched into a single forward
(`WindowLayout(B, T)`), so the cost is a few large matrix products per batch, never a Python
loop per token.

- `sliding_plan` (held-out scoring): with stride 1 every token t >= 1 of a segment is predicted
  from exactly min(N, t) preceding tokens of that segment; with stride S, windows of N tokens
  advance by S and score their last S positions (the first window scores all of them).
- `seed_plan` (`--protocol seed`): positions t = W .. W + P - 1 of the stream, each predicted
  from the W tokens before it (the seed's measurement: W = 128, P = 1000).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from agpt.errors import AgptError
from agpt.model.config import ModelConfig
from agpt.model.gpt import Batch, forward, logits_of
from agpt.model.layout import WindowLayout
from agpt.store.corpus import CorpusStore, open_corpus
from agpt.store.format import CORPUS_KIND, TRIE_KIND, check_header, open_root

#: the seed's protocol: its warm-up (= context) and default number of scored positions.
SEED_CONTEXT = 128
SEED_POSITIONS = 1000


@dataclass
class Plan:
    """Windows to run; window i scores positions first[i] .. length[i]-1 (see module doc)."""

    start: np.ndarray   # (W,) int64 first token of each window
    length: np.ndarray  # (W,) int64 tokens read by each window
    first: np.ndarray   # (W,) int64 first scored position of each window

    @property
    def n_windows(self) -> int:
        return len(self.start)

    @property
    def n_scored(self) -> int:
        return int((self.length - self.first).sum())

    @property
    def n_rows(self) -> int:
        return int(self.length.sum())

    @staticmethod
    def empty() -> Plan:
        z = np.zeros(0, np.int64)
        return Plan(z, z.copy(), z.copy())

    @staticmethod
    def concat(plans: list[Plan]) -> Plan:
        if not plans:
            return Plan.empty()
        return Plan(*(np.concatenate([getattr(p, f) for p in plans]).astype(np.int64)
                      for f in ("start", "length", "first")))

    def limit(self, max_tokens: int) -> Plan:
        """The plan cut after its first `max_tokens` scored tokens (the last window shortened)."""
        scored = self.length - self.first
        if max_tokens >= scored.sum():
            return self
        cum = np.cumsum(scored)
        k = int(np.searchsorted(cum, max_tokens, side="left"))   # window holding the last one
        start, length, first = self.start[:k + 1].copy(), self.length[:k + 1].copy(), self.first[:k + 1]
        length[k] = first[k] + max_tokens - (cum[k - 1] if k else 0)
        return Plan(start, length, first.copy())


def sliding_plan(n_tokens: int, context: int, stride: int = 1, offset: int = 0) -> Plan:
    """Sliding windows over tokens [offset, offset + n_tokens): tokens 1.. are scored once each."""
    if context < 1:
        raise AgptError(f"--context must be >= 1, got {context}")
    if not 1 <= stride <= context:
        raise AgptError(f"--stride must be between 1 and the context ({context}), got {stride}")
    last = n_tokens - 1                      # index of the last target; targets are 1 .. last
    if last < 1:
        return Plan.empty()
    if last <= context:
        one = np.array([offset], np.int64)
        return Plan(one, np.array([last], np.int64), np.zeros(1, np.int64))
    starts = np.arange(0, last - context + 1, stride, dtype=np.int64)
    first = np.full(len(starts), context - stride, np.int64)
    first[0] = 0
    end = int(starts[-1]) + context           # last target scored so far
    if end < last:                            # a final window ending exactly at the last token
        starts = np.append(starts, last - context)
        first = np.append(first, context - (last - end))
    return Plan(starts + offset, np.full(len(starts), context, np.int64), first)


def segments_plan(bounds: np.ndarray, context: int, stride: int = 1) -> Plan:
    """`sliding_plan` over each [a, b) of `bounds` (documents): no context crosses a boundary."""
    return Plan.concat([sliding_plan(int(b - a), context, stride, int(a)) for a, b in bounds])


def seed_plan(n_tokens: int, positions: int = SEED_POSITIONS, context: int = SEED_CONTEXT) -> Plan:
    """The seed's protocol: positions t = context .. context + positions - 1, each from the
    `context` tokens before it."""
    if positions < 1 or context < 1:
        raise AgptError(f"--positions and --context must be >= 1, got {positions} and {context}")
    if n_tokens < context + positions:
        raise AgptError(f"the seed protocol needs {context} warm-up tokens + {positions} positions "
                        f"= {context + positions} tokens, the stream has {n_tokens}: lower "
                        "--positions")
    w = np.arange(positions, dtype=np.int64)
    return Plan(w, np.full(positions, context, np.int64), np.full(positions, context - 1, np.int64))


def score(cfg: ModelConfig, be: Any, flat: Any, tokens: np.ndarray, plan: Plan,
          batch_rows: int = 8192, keep: bool = False,
          progress: Callable[[int], None] | None = None) -> tuple[float, np.ndarray | None]:
    """Summed NLL (nats) of the plan's scored tokens; with keep, also each token's NLL in plan
    order (window by window, position by position). progress(k) is told of k windows done."""
    if batch_rows < 1:
        raise AgptError(f"--batch must be >= 1 rows, got {batch_rows}")
    xp = be.xp
    tokens = np.asarray(tokens)
    if tokens.size and int(tokens.max()) >= cfg.vocab_size:
        raise AgptError(f"token id {int(tokens.max())} is outside the model's vocabulary of "
                        f"{cfg.vocab_size}: the model and the tokens do not match")
    w = be.asarray(flat, be.dtype)
    scored = plan.length - plan.first
    offs = np.concatenate(([0], np.cumsum(scored)[:-1])).astype(np.int64)
    out = np.empty(plan.n_scored, np.float64) if keep else None
    total = 0.0
    for t in np.unique(plan.length)[::-1]:
        t = int(t)
        idx = np.flatnonzero(plan.length == t)
        per = max(1, batch_rows // t)
        pos = np.arange(t, dtype=np.int64)
        for c in range(0, len(idx), per):
            sel = idx[c:c + per]
            at = plan.start[sel][:, None] + pos[None, :]                   # (B, T) token index
            rows = np.flatnonzero((pos[None, :] >= plan.first[sel][:, None]).ravel())
            target = tokens[(at + 1).ravel()[rows]].astype(np.int64)
            batch = Batch(be.asarray(tokens[at].ravel().astype(np.int64)),
                          be.prepare(WindowLayout(len(sel), t)))
            y, _ = forward(cfg, be, w, batch)
            logits = logits_of(cfg, be, w, y[be.asarray(rows)])
            m = logits.max(-1, keepdims=True)
            lse = (xp.log(xp.exp(logits - m).sum(-1, keepdims=True)) + m)[:, 0]
            nll = lse - logits[xp.arange(len(rows)), be.asarray(target)]
            nll = nll.astype(xp.float64)
            total += float(nll.sum())
            if out is not None:
                dest = (offs[sel][:, None] - plan.first[sel][:, None] + pos[None, :]).ravel()
                out[dest[rows]] = be.to_host(nll)
            if progress is not None:
                progress(len(sel))
    return total, out


@dataclass
class Perplexity:
    """One perplexity measurement, as `agpt perplexity` reports it."""

    nll: float            # mean NLL, nats per token
    ppl: float            # exp(nll)
    bits_per_token: float
    tokens: int           # tokens scored
    context: int
    stride: int
    seconds: float
    protocol: str         # "heldout" | "seed"
    source: str           # what was scored, in words

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def perplexity(cfg: ModelConfig, be: Any, flat: Any, tokens: np.ndarray, plan: Plan, *,
               context: int, stride: int, protocol: str, source: str, batch_rows: int = 8192,
               progress: Callable[[int], None] | None = None) -> Perplexity:
    """Run `plan` over `tokens` and summarise: NLL, PPL, bits per token, tokens, seconds."""
    if plan.n_scored == 0:
        raise AgptError(f"nothing to score in {source}: it needs at least 2 tokens")
    t0 = time.perf_counter()
    total, _ = score(cfg, be, flat, tokens, plan, batch_rows, progress=progress)
    be.synchronize()
    secs = time.perf_counter() - t0
    nll = total / plan.n_scored
    if not math.isfinite(nll):
        raise AgptError(f"the model's NLL on {source} is {nll}: the checkpoint holds NaN/Inf "
                        "weights")
    return Perplexity(nll, math.exp(min(nll, 700.0)), nll / math.log(2), plan.n_scored, context,
                      stride, secs, protocol, source)


def open_token_store(url: str) -> CorpusStore:
    """The corpus of a corpus store, or the one a trie store embeds (only its header is read)."""
    group = open_root(url, "r")
    meta = group.attrs.get("agpt")
    kind = meta.get("format") if isinstance(meta, dict) else None
    if kind == TRIE_KIND:
        check_header(group, TRIE_KIND, url, require_complete=False)
        try:
            sub = group["corpus"]
        except KeyError as e:
            raise AgptError(f"{url}: trie store has no embedded corpus; the store is damaged: "
                            "rebuild it") from e
        return CorpusStore.from_group(sub, f"{url}/corpus")
    if kind == CORPUS_KIND:
        return open_corpus(url)
    raise AgptError(f"{url} is not an AGPT corpus or trie store: give a store written by agpt")


def heldout_bounds(corpus: CorpusStore) -> np.ndarray:
    """(k, 2) [start, end) of each document's held-out part, relative to train_end."""
    a, n = corpus.train_end, corpus.n_tokens
    starts = corpus.doc_starts
    ends = np.append(starts[1:], n)
    lo, hi = np.maximum(starts, a), ends
    keep = hi > lo
    return (np.stack([lo[keep], hi[keep]], 1) - a).astype(np.int64).reshape(-1, 2)
