"""GPU training benchmark on tinyshakespeare (read from ../shared/data or $AGPT_TINYSHAKESPEARE).

    python bench/train_gpu.py [--depths 16,32] [--epochs 3] [--gradients exact,truncated] [--tf32]
    python bench/train_gpu.py --cases quality --depths 32

speed    for each depth: `agpt train` on the whole text (no held-out tail: the epoch the seed's
         figures time, 27.05 M rows at D=32) with the micro model, unigram partitions, one
         update per partition and the seed's weighting, for --epochs epochs; per epoch:
         seconds, rows/s, I/O wait (time the trainer waited for the next partition; the first
         unit's wait is the pipeline filling), peak GPU memory (pool). Epoch 1 reads every
         partition from the store (and compiles the kernels); later epochs reuse the units
         cached on the device (--stream: none is cached, so every epoch reads and stages
         every partition, as a trie larger than the GPU does); the whole run's seconds and
         the time between epochs (checkpoint writes). Then the window baseline's positions/s
         for the same model on the same GPU (seq = depth; batches of 64, 256 and 1024 windows; median of 3 repeats), and
         the floor implied by the FLOPs and bytes per row on this GPU.
quality  the seed recipe (3 epochs) on the trie with a 10% held-out tail, then the window
         baseline (seq = depth, adamw 3e-3, batch 256) for the same training time; held-out
         PPL of both (sliding window, context = depth, stride 1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from train import heldout_ppl, stores, window_rates, workdir

from agpt.backend import get_backend
from agpt.model.config import preset
from agpt.model.params import init_params
from agpt.store.trie import open_trie
from agpt.train.optim import OptimConfig, Optimizer
from agpt.train.units import load_unit, unit_count

#: nominal dense peaks: fp32 FLOP/s (CUDA cores), TF32 FLOP/s (tensor cores), HBM bytes/s
PEAKS = {"H100 PCIe": (51e12, 378e12, 2.0e12), "H100": (67e12, 495e12, 3.35e12),
         "H200": (67e12, 495e12, 4.8e12)}


def peaks(name: str) -> tuple[str, tuple[float, float, float]]:
    for key in sorted(PEAKS, key=len, reverse=True):
        if all(w in name for w in key.split()):
            return key, PEAKS[key]
    return "H100", PEAKS["H100"]


def mean_context(trie: str) -> tuple[int, float]:
    """Rows of an epoch and their mean context length (ancestors attended, self included)."""
    t = open_trie(trie)
    rows = tot = 0
    for i in range(unit_count(t)):
        u = load_unit(t, i)
        rows += u.n_loss_rows
        tot += int(u.depth[u.loss].sum())
    return rows, tot / max(rows, 1)


def floor(cfg, rows: int, ctx: float, device: str, tf32: bool) -> dict:
    """The time an epoch needs at least: its FLOPs at peak, or its activation traffic at peak
    bandwidth, whichever is larger.

    FLOPs/row: matmuls 6 x (L (4 d^2 + 2 d f) + d V) (forward + two backward products) and
    attention 18 E H x ctx per layer (forward q.k and p.v; backward recomputes q.k, and forms
    dp, dq, dk, dv). Bytes/row: each activation saved for the backward is written once and read
    once, 2 x 4 x L (9 d + 2 f + h), plus the row's logits written and read, 2 x 4 x V."""
    d, f, h, L, V, e = (cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_layers, cfg.vocab_size,
                        cfg.head_dim)
    flops = 6 * (L * (4 * d * d + 2 * d * f) + d * V) + L * 18 * e * h * ctx
    nbytes = 2 * 4 * L * (9 * d + 2 * f + h) + 2 * 4 * V
    kind, (fp32, tf, bw) = peaks(device)
    t_flop = rows * flops / (tf if tf32 else fp32)
    t_bytes = rows * nbytes / bw
    return {"flops_per_row": flops, "bytes_per_row": nbytes, "peaks_of": kind,
            "compute_floor_s": t_flop, "memory_floor_s": t_bytes, "floor_s": max(t_flop, t_bytes)}


def speed(work: Path, depth: int, epochs: int, gradient: str, tf32: bool, loaders: int,
          graphs: bool = True, cache: bool = True, host_workers: int = 0) -> dict:
    _, trie = stores(work, depth, holdout=0.0)     # the whole text, as the seed's figures
    tag = (f"speed-d{depth}-{gradient}{'-tf32' if tf32 else ''}{'' if graphs else '-nographs'}"
           f"{'' if cache else '-stream'}")
    out, metrics = work / f"{tag}.ckpt", work / f"{tag}.jsonl"
    # the command a user runs, in its own process: its start (imports, the worker processes'
    # fork server, the device) is part of what epoch 1 waits for
    cmd = [sys.executable, "-m", "agpt", "train", trie, "-o", str(out), "--epochs", str(epochs),
           "--step", "partition", "--gradient", gradient, "--mass-weight", "linear",
           "--entropy-lambda", "1.0", "--optimizer", "rmsprop", "--lr", "3e-3", "--beta2",
           "0.999", "--loaders", str(loaders), "--host-workers", str(host_workers),
           "--cuda-graphs" if graphs else "--no-cuda-graphs",
           "--gpu-cache" if cache else "--no-gpu-cache", "--device", "cuda", "--metrics",
           str(metrics), "--quiet", "--force", *(["--tf32"] if tf32 else [])]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    run_s = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"agpt train failed:\n{done.stderr}")
    res = json.loads(done.stdout.splitlines()[-1])
    eps = [json.loads(x) for x in metrics.read_text().splitlines()]
    eps = [r for r in eps if r["event"] == "epoch"]
    # epoch 1 reads the store; the epoch after it captures the CUDA graphs: steady from then on
    warm = eps[2:] if len(eps) > 2 and eps[1].get("cuda_graphs") else eps[1:] or eps
    import cupy as cp
    name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    cfg = preset("micro", open_trie(trie).vocab_size, depth)
    rows, ctx = mean_context(trie)
    return {"case": f"speed D={depth}{'' if cache else ' streamed'}", "gradient": gradient,
            "tf32": tf32,
            "cuda_graphs": [r.get("cuda_graphs", 0) for r in eps],
            "cuda_graph_classes": [r.get("cuda_graph_classes", 0) for r in eps], "device": name,
            "backend": res["device"], "rows_per_epoch": eps[0]["rows"],
            "epoch_s": [r["seconds"] for r in eps], "io_wait_s": [r["io_wait_s"] for r in eps],
            "first_unit_wait_s": [r.get("first_unit_wait_s") for r in eps],
            "first_epoch_s": eps[0]["seconds"],
            # epoch 1: the device warm-up's seconds, and when the first worker process had
            # started (seconds into the epoch; None: no workers)
            "warm_up_s": eps[0].get("warm_up_s"), "workers_ready_s": eps[0].get("workers_ready_s"),
            # the whole command (start, epochs, checkpoints), and the time between one epoch's end
            # and the next one's start (its checkpoint write): work moved there is not hidden
            "run_s": run_s,
            "between_epochs_s": [round(b["time_s"] - b["seconds"] - a["time_s"], 3)
                                 for a, b in zip(eps[:-1], eps[1:], strict=True)],
            "warm_epoch_s_median": statistics.median(r["seconds"] for r in warm),
            "warm_rows_per_s_median": statistics.median(r["rows_per_s"] for r in warm),
            "gpu_peak_mb": max(r["gpu_peak_mb"] for r in eps), "chunk_rows": eps[0]["chunk_rows"],
            "mean_context": ctx, **floor(cfg, rows, ctx, name, tf32)}


def window(work: Path, depth: int, tf32: bool, repeats: int = 3) -> dict:
    corpus, _ = stores(work, depth)
    from agpt.store.corpus import open_corpus
    c = open_corpus(corpus)
    be = get_backend("cuda", "float32", tf32)
    cfg = preset("micro", c.vocab_size, depth)
    flat = be.asarray(init_params(cfg, np.random.default_rng(0)), be.dtype)
    grad = be.xp.zeros_like(flat)
    opt = Optimizer(OptimConfig("adamw", lr=1e-4), be.xp, flat)
    out = {"case": f"window D={depth}", "tf32": tf32}
    for batch in (64, 256, 1024):
        r = window_rates(be, cfg, flat, grad, opt, c, depth, batch, 50, repeats)
        out[f"positions_per_s_batch{batch}"] = statistics.median(r)
    return out


def quality(work: Path, depth: int, epochs: int, tf32: bool) -> dict:
    """Trie run first, then the window run for the same training time (one GPU: one at a time)."""
    corpus, trie = stores(work, depth)
    out_t, out_w = work / f"q-trie-d{depth}.ckpt", work / f"q-window-s{depth}.ckpt"
    agpt = [sys.executable, "-m", "agpt"]
    extra = ["--device", "cuda", "--quiet", "--force", *(["--tf32"] if tf32 else [])]
    t0 = time.perf_counter()
    subprocess.run([*agpt, "train", trie, "-o", str(out_t), "--recipe", "seed", "--epochs",
                    str(epochs), *extra], check=True)
    wall_t = time.perf_counter() - t0
    recs = [json.loads(x) for x in Path(f"{out_t}.metrics.jsonl").read_text().splitlines()]
    train_s = sum(r["seconds"] for r in recs if r["event"] == "epoch")
    t0 = time.perf_counter()
    subprocess.run([*agpt, "train-window", trie, "-o", str(out_w), "--seq-len", str(depth),
                    "--batch-size", "256", "--starts", "random", "--steps", str(10**9),
                    "--seconds", f"{train_s:.3f}", "--checkpoint-every", "0", "--optimizer",
                    "adamw", "--lr", "3e-3", *extra], check=True)
    wall_w = time.perf_counter() - t0
    wrecs = [json.loads(x) for x in Path(f"{out_w}.metrics.jsonl").read_text().splitlines()]
    wsteps = [r for r in wrecs if r["event"] == "step"]
    return {"case": f"quality D={depth}", "epochs": epochs, "tf32": tf32,
            "trie": {"train_s": train_s, "process_wall_s": wall_t,
                     "updates": sum(1 for r in recs if r["event"] == "step"),
                     **heldout_ppl(corpus, str(out_t), depth, "cuda")},
            "window": {"train_s": sum(r["seconds"] for r in wrecs if r["event"] == "epoch"),
                       "process_wall_s": wall_w, "updates": len(wsteps),
                       "positions": sum(r["positions"] for r in wsteps),
                       **heldout_ppl(corpus, str(out_w), depth, "cuda")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cases", default="speed,window")
    ap.add_argument("--depths", default="16,32")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--gradients", default="exact")
    ap.add_argument("--tf32", action="store_true")
    ap.add_argument("--loaders", type=int, default=0, help="0: the trainer's default (4 on the GPU)")
    ap.add_argument("--host-workers", type=int, default=0,
                    help="0: the trainer's default; -1: prepare units on the loader threads")
    ap.add_argument("--no-cuda-graphs", action="store_true",
                    help="launch every unit's kernels from Python (no graph replay)")
    ap.add_argument("--stream", action="store_true",
                    help="keep no partition on the device: every epoch reads and stages them "
                         "all, as a trie larger than the GPU does (--no-gpu-cache)")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    work = workdir(a.workdir, "agpt-gpu-bench-")
    if work is None:
        return
    for depth in (int(x) for x in a.depths.split(",")):
        for case in a.cases.split(","):
            t0 = time.perf_counter()
            if case == "speed":
                res = [speed(work, depth, a.epochs, g, a.tf32, a.loaders, not a.no_cuda_graphs,
                             not a.stream, a.host_workers)
                       for g in a.gradients.split(",")]
            elif case == "window":
                res = [window(work, depth, a.tf32)]
            elif case == "quality":
                res = [quality(work, depth, a.epochs, a.tf32)]
            else:
                raise SystemExit(f"unknown case {case!r}: use speed, window or quality")
            for r in res:
                r["bench_seconds"] = time.perf_counter() - t0
                print(json.dumps(r, default=float), flush=True)


if __name__ == "__main__":
    main()
