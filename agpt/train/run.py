"""Start or resume a training run: checkpoints in, a Session, the trainer loop, checkpoints out.

The CLI (`agpt train`, `agpt train-window`) and the benchmarks call these; everything a run
depends on is recorded in the checkpoint's state so `--resume` continues it exactly and a
checkpoint is never silently continued with other settings.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from agpt.backend import get_backend
from agpt.errors import AgptError
from agpt.model.config import ModelConfig, preset
from agpt.model.params import init_params
from agpt.store.checkpoint import Checkpoint, check_vocabulary, load_checkpoint
from agpt.store.corpus import CorpusStore, open_corpus
from agpt.store.trie import TrieStore, open_trie
from agpt.train.optim import OptimConfig
from agpt.train.session import Interrupted, Session, auto_lr, default_metrics_path
from agpt.train.trie_trainer import TrieArgs, train_epochs, unit_count, warm_up_host
from agpt.train.window_trainer import WindowArgs, corpus_windows, train_windows, updates_per_epoch

#: the seed's recipe (SPEC §8): rmsprop without bias correction, β 0.999, lr 3e-3, one warmup
#: epoch then cosine, entropy λ 1, linear mass weight, one step per root-child partition, 3 epochs
SEED_RECIPE: dict[str, Any] = {
    "optimizer": "rmsprop", "beta2": 0.999, "lr": 3e-3, "schedule": "warmup-cosine",
    "warmup_epochs": 1.0, "entropy_lambda": 1.0, "mass_weight": "linear", "step": "partition",
    "epochs": 3, "auto_lr": True, "bias_correction": False,
}


#: trie arguments that change memory and speed, never the math: free to change on --resume
RESOURCE_ARGS = ("epochs", "memory_budget", "gpu_memory_budget", "loaders", "cuda_graphs",
                 "gpu_cache")


def _starting_checkpoint(init: str | None, model: str, vocab_tok: dict, vocab_size: int,
                         context: int, seed: int, dtype: str) -> Checkpoint:
    if init:
        return load_checkpoint(init)
    cfg = preset(model, vocab_size, context)
    params = init_params(cfg, np.random.default_rng(seed), np.dtype(dtype))
    return Checkpoint(cfg, params, {}, vocab_tok, {"init": {"preset": model, "seed": seed}})


def _prepare(kind: str, source: dict[str, Any], out: str, resume: bool, init: str | None,
             model: str, context: int, seed: int, dtype: str, settings: dict[str, Any],
             corpus: CorpusStore, force: bool = False) -> Checkpoint:
    """The checkpoint to continue (resume) or start from (init / a fresh preset)."""
    tok = corpus.tokenizer.to_meta()
    if resume:
        ck = load_checkpoint(out)
        st = ck.state
        if st.get("kind") != kind:
            raise AgptError(f"{out} was written by agpt {st.get('kind', '?')} training, not {kind}; "
                            "start a new run with another -o")
        if st.get("source", {}).get("corpus_sha256") != source["corpus_sha256"]:
            raise AgptError(f"{out} was trained on another corpus than {source['url']}; "
                            "resume with the store it was trained on")
        for k, v in settings.items():
            old = st.get("settings", {}).get(k)
            if old is not None and old != v:
                raise AgptError(f"{out} was written with {k}={old!r}, not {v!r}: resume without "
                                "changing settings (or start a new run with another -o)")
    else:
        if os.path.exists(out) and not force:
            raise AgptError(f"{out} exists: pass --resume to continue it, --force to replace it, "
                            "or choose another -o")
        ck = _starting_checkpoint(init, model, tok, corpus.vocab_size, context, seed, dtype)
        ck.opt_state = {}   # a new run starts a fresh optimizer
        ck.state = {"kind": kind, "source": source, "settings": settings,
                    "init": init or ck.state.get("init")}
    check_vocabulary(ck.tokenizer, tok, f"model {init or out}")
    return ck


def _session(ck: Checkpoint, out: str, optim: OptimConfig, total: int, base_lr: float,
             device: str, metrics: str | None, progress: bool, resume: bool,
             tf32: bool = False) -> Session:
    be = get_backend(device, ck.params.dtype, tf32)
    path = metrics if metrics is not None else default_metrics_path(out)
    if path and not resume and os.path.exists(path):
        os.remove(path)            # a new run starts a new metrics file
    s = Session(ck.config, be, ck, out, optim, total, base_lr, path, progress)
    s.last_good = out if resume else ""
    return s


def train_trie(store_url: str, out: str, args: TrieArgs, optim: OptimConfig, *,
               init: str | None = None, model: str = "micro", resume: bool = False,
               auto: bool = False, warmup_epochs: float = 0.0, device: str = "cpu",
               dtype: str = "float32", metrics: str | None = None, until_epoch: int | None = None,
               progress: bool = True, force: bool = False, tf32: bool = False) -> dict[str, Any]:
    """Train (or continue training) a model on a trie store's radix layer."""
    store: TrieStore = open_trie(store_url)
    store._need("radix")
    warm_up_host(store, args, device)
    n_units = unit_count(store)
    per_epoch = n_units if args.step == "partition" else 1
    base_lr = auto_lr(optim.lr, per_epoch) if auto else optim.lr
    warm = int(round(warmup_epochs * per_epoch))
    optim = OptimConfig(**{**optim.to_dict(), "warmup_steps": warm})
    settings = {"trie": {k: v for k, v in args.to_dict().items() if k not in RESOURCE_ARGS},
                "optimizer": optim.to_dict(), "auto_lr": auto}
    source = {"url": store_url, "corpus_sha256": store.corpus.corpus_sha256,
              "max_depth": store.max_depth, "partitions": store.n_partitions}
    ck = _prepare("trie", source, out, resume, init, model, store.max_depth, args.seed, dtype,
                  settings, store.corpus, force)
    s = _session(ck, out, optim, args.epochs * per_epoch, base_lr, device, metrics, progress,
                 resume, tf32)
    _drive(s, lambda: train_epochs(s, store, args, until_epoch))
    return {"checkpoint": out, **s.pos.to_dict(), "updates_per_epoch": per_epoch,
            "lr": base_lr, "device": s.be.name}


def train_window(corpus_url: str, out: str, args: WindowArgs, optim: OptimConfig, *,
                 init: str | None = None, model: str = "micro", resume: bool = False,
                 warmup_epochs: float = 0.0, device: str = "cpu", dtype: str = "float32",
                 metrics: str | None = None, seconds: float | None = None, progress: bool = True,
                 force: bool = False, tf32: bool = False) -> dict[str, Any]:
    """Train (or continue) the same model on ordinary windows of a corpus (or trie) store."""
    corpus = _corpus_of(corpus_url)
    _, starts, _ = corpus_windows(corpus, args.seq_len)
    per_epoch = updates_per_epoch(args, len(starts))
    epochs = args.epochs if args.starts == "all" else 1
    optim = OptimConfig(**{**optim.to_dict(), "warmup_steps": int(round(warmup_epochs * per_epoch))})
    settings = {"window": {k: v for k, v in args.to_dict().items()
                           if k not in ("epochs", "steps", "checkpoint_every")},
                "optimizer": optim.to_dict()}
    source = {"url": corpus_url, "corpus_sha256": corpus.corpus_sha256}
    ck = _prepare("window", source, out, resume, init, model, args.seq_len, args.seed, dtype,
                  settings, corpus, force)
    s = _session(ck, out, optim, epochs * per_epoch, optim.lr, device, metrics, progress,
                 resume, tf32)
    _drive(s, lambda: train_windows(s, corpus, args, seconds))
    return {"checkpoint": out, **s.pos.to_dict(), "updates_per_epoch": per_epoch,
            "device": s.be.name}


def _corpus_of(url: str) -> CorpusStore:
    from agpt.trie.compact import is_trie_store
    return open_trie(url).corpus if is_trie_store(url) else open_corpus(url)


def _drive(s: Session, loop: Callable[[], None]) -> None:
    """Run a trainer loop; Ctrl-C saves the state after the last update, then stops."""
    try:
        loop()
    except KeyboardInterrupt:
        s.save()
        raise Interrupted(f"interrupted; checkpoint saved to {s.out} at epoch {s.pos.epoch + 1}, "
                           f"unit {s.pos.unit}; rerun with --resume to continue") from None
    finally:
        s.close()


__all__ = ["SEED_RECIPE", "train_trie", "train_window", "ModelConfig"]
