"""`agpt train-window`: the same model trained on ordinary windows (the baseline).

Windows of `seq_len` tokens with stride-1 starts (a start needs a successor in its document;
windows stop at the document end). `starts="all"` visits every start once per epoch in a
seeded order; `starts="random"` draws each batch uniformly from an RNG keyed by (seed, update).
Each update's loss is the mean NLL over the batch's predictions.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from agpt.errors import AgptError
from agpt.model.gpt import loss_and_grad
from agpt.store.corpus import CorpusStore
from agpt.train.batches import window_batch, window_starts
from agpt.train.session import Session


@dataclass(frozen=True)
class WindowArgs:
    seq_len: int = 32
    batch_size: int = 64
    starts: str = "random"       # random | all
    epochs: int = 1              # with starts=all
    steps: int = 1000            # with starts=random
    seed: int = 0
    checkpoint_every: int = 1000

    def __post_init__(self) -> None:
        if self.seq_len < 1 or self.batch_size < 1 or self.epochs < 1 or self.steps < 1:
            raise AgptError("--seq-len, --batch-size, --epochs and --steps must be >= 1")
        if self.starts not in ("random", "all"):
            raise AgptError(f"unknown --starts {self.starts!r}: use random or all")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def corpus_windows(corpus: CorpusStore, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training tokens, every window start and its number of predictions."""
    toks = corpus.train_tokens()
    docs = [(int(a), int(b)) for a, b in corpus.train_documents()]
    starts, lengths = window_starts(docs, seq_len)
    if len(starts) == 0:
        raise AgptError(f"{corpus.url} has no training windows (fewer than 2 tokens per document)")
    return toks, starts, lengths


def updates_per_epoch(args: WindowArgs, n_starts: int) -> int:
    return math.ceil(n_starts / args.batch_size) if args.starts == "all" else args.steps


def train_windows(s: Session, corpus: CorpusStore, args: WindowArgs,
                  seconds: float | None = None) -> None:
    cfg, be = s.cfg, s.be
    toks, starts, lengths = corpus_windows(corpus, args.seq_len)
    per_epoch = updates_per_epoch(args, len(starts))
    epochs = args.epochs if args.starts == "all" else 1
    t0 = time.perf_counter()
    stop = False
    while s.pos.epoch < epochs and not stop:
        e = s.pos.epoch
        order = np.random.default_rng([args.seed, e]).permutation(len(starts)) \
            if args.starts == "all" else None
        t_ep, n_ep = time.perf_counter(), 0
        l_ep: Any = 0.0
        while s.pos.unit < per_epoch:
            k = s.pos.unit
            if order is not None:
                sel = order[k * args.batch_size: (k + 1) * args.batch_size]
            else:
                # keyed by (seed, update): a resumed run draws exactly the same batches
                rng = np.random.default_rng([args.seed, s.pos.update])
                sel = rng.integers(0, len(starts), args.batch_size)
            batch, z = window_batch(be, toks, starts[sel], lengths[sel], args.seq_len)
            # the loss stays on the device (a device scalar): reading it per batch would make
            # the host wait for each batch before preparing the next
            loss_sum = loss_and_grad(cfg, be, s.params, batch, s.grad)
            lr = s.lr()
            s.update(z, loss_sum, f"epoch {e + 1} batch {k + 1}/{per_epoch}", positions=int(z))
            s.pos.unit = k + 1
            n_ep += int(z)
            l_ep = l_ep + loss_sum
            s.show(f"epoch {e + 1}/{epochs} batch {k + 1}/{per_epoch} "
                   f"lr {lr:.3g} positions/s {n_ep / (time.perf_counter() - t_ep):,.0f}")
            if args.checkpoint_every and s.pos.update % args.checkpoint_every == 0:
                s.save()
            if seconds is not None and time.perf_counter() - t0 >= seconds:
                stop = True
                break
        s.settle()
        l_ep = float(l_ep)
        secs = time.perf_counter() - t_ep
        if not stop:
            s.pos.epoch, s.pos.unit = e + 1, 0
        s.log("epoch", loss=l_ep / max(n_ep, 1), positions=n_ep, seconds=round(secs, 3),
              positions_per_s=round(n_ep / max(secs, 1e-9), 1), lr=s.lr())
        s.show(f"epoch {e + 1}: loss {l_ep / max(n_ep, 1):.4f}, {n_ep:,} positions in {secs:.1f} s",
               final=True)
        s.save()
