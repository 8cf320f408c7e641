"""Training benchmarks on tinyshakespeare (read from ../shared/data; skipped when absent).

    python bench/train.py --cases throughput [--repeats 3] [--device cpu]
    python bench/train.py --cases quality [--depth 16] [--epochs 3]

throughput  trie rows/s (exact gradient, one update per partition, micro model) over a fixed
            set of partitions after a warm-up partition, and window positions/s (batch 64 of
            seq D) after warm-up steps; medians of --repeats.
quality     the seed recipe on a D-deep trie of the corpus with a 10% held-out tail, then the
            window baseline (seq D, adamw 3e-3, random starts) for the same wall time; held-out
            PPL of both (sliding window, context D, stride 1). Slow on a CPU: ~an hour at D=16.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TS = Path(os.environ.get("AGPT_TINYSHAKESPEARE",
                        REPO.parent / "shared" / "data" / "tinyshakespeare.txt"))

from agpt.backend import get_backend  # noqa: E402
from agpt.ingest import ingest  # noqa: E402
from agpt.model.config import preset  # noqa: E402
from agpt.model.gpt import loss_and_grad  # noqa: E402
from agpt.model.params import init_params  # noqa: E402
from agpt.store.trie import open_trie  # noqa: E402
from agpt.train.batches import unit_batch, window_batch  # noqa: E402
from agpt.train.objective import Weighting  # noqa: E402
from agpt.train.optim import OptimConfig, Optimizer  # noqa: E402
from agpt.train.trie_trainer import rows_for_budget  # noqa: E402
from agpt.train.units import chunks, load_unit  # noqa: E402
from agpt.train.window_trainer import corpus_windows  # noqa: E402
from pipelines.build import BuildConfig, build_trie  # noqa: E402


def stores(work: Path, depth: int, holdout: float = 0.1) -> tuple[str, str]:
    """(corpus, trie) of tinyshakespeare with the last `holdout` of it held out (0: the whole
    text, the epoch the seed's figures time: 27.05 M rows at D=32)."""
    tag = "" if holdout == 0.1 else f"-h{holdout:g}"
    corpus, trie = str(work / f"ts{tag}.zarr"), str(work / f"ts{depth}{tag}.zarr")
    if not Path(corpus).exists():
        ingest([str(TS)], corpus, holdout=holdout, force=True)
    if not Path(trie).exists():
        build_trie(corpus, trie, "radix", BuildConfig(max_depth=depth, progress=False))
    return corpus, trie


def throughput(work: Path, depth: int, repeats: int, device: str) -> dict:
    _, trie = stores(work, depth)
    t = open_trie(trie)
    be = get_backend(device, "float32")
    cfg = preset("micro", t.vocab_size, depth)
    flat = be.asarray(init_params(cfg, np.random.default_rng(0)), be.dtype)
    grad = be.xp.zeros_like(flat)
    opt = Optimizer(OptimConfig("rmsprop", lr=1e-4), be.xp, flat)
    max_rows = min(rows_for_budget(be, cfg, depth, 2 << 30), be.chunk_rows)
    sizes = np.array([load_unit(t, p).n_rows for p in range(t.n_partitions)])
    picks = [int(p) for p in np.argsort(np.abs(sizes - 60_000))[:4]]   # four ~60K-row units
    units = [load_unit(t, p) for p in picks]
    w = Weighting("linear", 1.0)

    def one(u) -> None:
        z = 0.0
        for c in chunks(u, max_rows):
            b, zc = unit_batch(be, c, t.vocab_size, w)
            loss_and_grad(cfg, be, flat, b, grad)
            z += zc
        grad[...] /= z
        opt.step(flat, grad, 1e-4)
        grad[...] = 0

    one(units[0])                                            # warm-up
    rates = []
    rows = sum(u.n_rows for u in units)
    for _ in range(repeats):
        be.synchronize()
        t0 = time.perf_counter()
        for u in units:
            one(u)
        be.synchronize()
        rates.append(rows / (time.perf_counter() - t0))
    wrates = window_rates(be, cfg, flat, grad, opt, t.corpus, depth, 64, 10, repeats)
    return {"case": f"throughput D={depth}", "device": be.name, "trie_rows": rows,
            "trie_rows_per_s": statistics.median(rates), "trie_rows_per_s_all": rates,
            "window_positions_per_s": statistics.median(wrates), "window_all": wrates,
            "epoch_rows": int(t.totals().get("radix_edge_tokens", 0))}


def workdir(path: str | None, prefix: str) -> Path | None:
    """The benchmark's work directory, or None (after saying so) when the corpus is absent."""
    if not TS.is_file():
        print(f"{TS} not found: skipping")
        return None
    work = Path(path or tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    return work


def window_rates(be, cfg, flat, grad, opt, corpus, seq_len: int, batch: int, steps: int,
                 repeats: int) -> list[float]:
    """Window-training positions/s (random starts, one update per batch) per repeat of `steps`
    updates, after one warm-up round."""
    toks, starts, lengths = corpus_windows(corpus, seq_len)
    rng = np.random.default_rng(0)
    rates = []
    for r in range(repeats + 1):
        be.synchronize()
        t0, n = time.perf_counter(), 0
        for _ in range(steps):
            sel = rng.integers(0, len(starts), batch)
            b, z = window_batch(be, toks, starts[sel], lengths[sel], seq_len)
            loss_and_grad(cfg, be, flat, b, grad)
            grad[...] /= z
            opt.step(flat, grad, 1e-4)
            grad[...] = 0
            n += int(z)
        be.synchronize()
        if r:                                                # the first round is warm-up
            rates.append(n / (time.perf_counter() - t0))
    return rates


def heldout_ppl(corpus_url: str, ckpt: str, context: int, device: str) -> dict:
    """`agpt perplexity` on the held-out tail: sliding window, context D, stride 1."""
    out = subprocess.run([sys.executable, "-m", "agpt", "perplexity", ckpt, "--store", corpus_url,
                          "--context", str(context), "--device", device, "--json"],
                         capture_output=True, text=True, check=True).stdout
    r = json.loads(out)
    return {k: r[k] for k in ("nll", "ppl", "bits_per_token", "tokens")}


def quality(work: Path, depth: int, epochs: int, device: str) -> dict:
    """The seed recipe on the trie and the window baseline, run side by side for the same wall
    time: the window run starts with the trie run and is stopped (Ctrl-C: it checkpoints) the
    moment the trie run ends. Each process gets one BLAS thread, so on a 2-core machine each
    has a core."""
    corpus, trie = stores(work, depth)
    out_t, out_w = work / f"trie-d{depth}.ckpt", work / f"window-s{depth}.ckpt"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    agpt = [sys.executable, "-m", "agpt"]
    dev = ["--device", device, "--quiet", "--force"]
    window = subprocess.Popen([*agpt, "train-window", trie, "-o", str(out_w), "--seq-len", str(depth),
                               "--batch-size", "64", "--starts", "random", "--steps", str(10**9),
                               "--checkpoint-every", "0", "--optimizer", "adamw", "--lr", "3e-3",
                               *dev], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              # a shell's background job ignores SIGINT and children inherit that;
                              # restore it so Ctrl-C below stops (and checkpoints) the window run
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t0 = time.perf_counter()
    res_t = subprocess.run([*agpt, "train", trie, "-o", str(out_t), "--recipe", "seed", "--epochs",
                            str(epochs), *dev], env=env, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    window.send_signal(signal.SIGINT)
    _, werr = window.communicate()
    wsecs = time.perf_counter() - t0
    if res_t.returncode:
        raise SystemExit(f"trie training failed: {res_t.stderr[-2000:]}")
    if window.returncode not in (0, 130):
        raise SystemExit(f"window training failed: {werr.decode()[-2000:]}")

    def last(path: Path, key: str) -> dict:
        rows = [json.loads(x) for x in Path(str(path) + ".metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if r["event"] == "step"]
        return {"updates": len(steps), key: sum(r.get(key.split("_")[0], 0) for r in steps),
                "last_train_loss": steps[-1]["loss"] if steps else None}

    return {"case": f"quality D={depth}", "device": device, "epochs": epochs,
            "trie": {"seconds": secs, **last(out_t, "rows_total"),
                     **heldout_ppl(corpus, str(out_t), depth, device)},
            "window": {"seconds": wsecs, **last(out_w, "positions_total"),
                       **heldout_ppl(corpus, str(out_w), depth, device)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cases", default="throughput")
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    work = workdir(a.workdir, "agpt-train-bench-")
    if work is None:
        return
    for case in a.cases.split(","):
        t0 = time.perf_counter()
        if case == "throughput":
            res = throughput(work, a.depth, a.repeats, a.device)
        elif case == "quality":
            res = quality(work, a.depth, a.epochs, a.device)
        else:
            raise SystemExit(f"unknown case {case!r}: use throughput or quality")
        res["bench_seconds"] = time.perf_counter() - t0
        print(json.dumps(res, default=float), flush=True)


if __name__ == "__main__":
    main()
