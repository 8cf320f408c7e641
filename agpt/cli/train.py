"""`agpt train` (exact aggregated-gradient training on a trie store) and `agpt train-window`
(the same model on ordinary windows): same optimizers, checkpoints and metrics."""

from __future__ import annotations

import json

import click

from agpt.cli import cli
from agpt.train.optim import OPTIMIZERS, SCHEDULES


def _common(f):
    """Model, optimizer, schedule and run options shared by both trainers."""
    opts = [
        click.option("-o", "--out", required=True, help="Checkpoint written by this run (Zarr)."),
        click.option("--resume", is_flag=True, help="Continue the run saved at --out exactly."),
        click.option("--force", is_flag=True, help="Start over, replacing a checkpoint at --out."),
        click.option("--init", default=None, help="Start from this checkpoint (agpt init / import)."),
        click.option("--model", "model", default="micro", show_default=True,
                     help="Preset of a fresh model: micro (the seed's µGPT), small, base, large."),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=None,
                     help="[default: adamw; seed recipe: rmsprop]"),
        click.option("--lr", type=float, default=None, help="Peak learning rate [default: 3e-3]."),
        click.option("--beta1", type=float, default=None, help="adam/adamw β1, momentum coefficient [0.9]."),
        click.option("--beta2", type=float, default=None, help="adam/adamw β2, rmsprop decay [0.999]."),
        click.option("--eps", type=float, default=None, help="Optimizer ε [1e-8]."),
        click.option("--weight-decay", type=float, default=None, help="Decoupled weight decay [0]."),
        click.option("--clip", type=float, default=None, help="Global gradient-norm clip, 0 = off [0]."),
        click.option("--rmsprop-bias-correction/--no-rmsprop-bias-correction", default=None,
                     help="Textbook rmsprop (the seed has none) [off]."),
        click.option("--schedule", type=click.Choice(SCHEDULES), default=None, help="[constant]"),
        click.option("--warmup-epochs", type=float, default=None, help="warmup-cosine: warmup length [0]."),
        click.option("--min-lr", type=float, default=None, help="Cosine floor [0]."),
        click.option("--seed", type=int, default=0, show_default=True, help="Init / order / sampling seed."),
        click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="auto",
                     show_default=True, help="auto: the GPU when there is one."),
        click.option("--tf32", is_flag=True,
                     help="GPU: float32 matmuls on TF32 tensor cores (faster, ~1e-3 relative)."),
        click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32",
                     show_default=True, help="Of a fresh model."),
        click.option("--metrics", default=None, help="JSON-lines metrics [default: OUT.metrics.jsonl]."),
        click.option("--quiet", is_flag=True, help="No progress line."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _optim(recipe: dict, kw: dict):
    from agpt.train.optim import OptimConfig

    def pick(name: str, default):
        v = kw.get(name)
        return v if v is not None else recipe.get(name, default)

    return OptimConfig(name=pick("optimizer", "adamw"), lr=pick("lr", 3e-3),
                       beta1=pick("beta1", 0.9), beta2=pick("beta2", 0.999), eps=pick("eps", 1e-8),
                       weight_decay=pick("weight_decay", 0.0), clip=pick("clip", 0.0),
                       bias_correction=pick("rmsprop_bias_correction", False),
                       schedule=pick("schedule", "constant"), min_lr=pick("min_lr", 0.0))


@cli.command("train")
@click.argument("store")
@_common
@click.option("--recipe", type=click.Choice(["seed"]), default=None,
              help="seed: rmsprop β 0.999, lr 3e-3, warmup-cosine (1 epoch), entropy λ 1, "
                   "linear mass weight, one step per partition, auto-LR, 3 epochs.")
@click.option("--epochs", type=int, default=None, help="Epochs of the whole run [1; seed: 3].")
@click.option("--until-epoch", type=int, default=None,
              help="Stop (checkpointed) after this epoch; --resume continues the same schedule.")
@click.option("--step", type=click.Choice(["partition", "epoch"]), default=None,
              help="One optimizer update per partition (the seed's) or per epoch [partition].")
@click.option("--gradient", type=click.Choice(["exact", "truncated"]), default="exact",
              show_default=True, help="truncated: the seed's stop-gradient at ancestor K/V.")
@click.option("--mass-weight", type=click.Choice(["off", "log", "sqrt", "linear"]), default=None,
              help="Node weight f(mass); linear with λ=0 is the exact corpus objective [linear].")
@click.option("--entropy-lambda", type=float, default=None,
              help="Endpoint weight 1 + λ·H/ln V [0; seed: 1].")
@click.option("--auto-lr/--no-auto-lr", default=None, help="lr × 65 / updates per epoch [off; seed: on].")
@click.option("--memory-budget", default="2GB", show_default=True,
              help="CPU: activation memory per chunk; bigger partitions are chunked (same math).")
@click.option("--gpu-memory-budget", default="0",
              help="GPU: device memory this run may take (half for activations, the rest for "
                   "staged and cached partitions); bigger partitions are chunked (same math) "
                   "[0: 90%% of free memory].")
@click.option("--loaders", type=int, default=0, show_default=True,
              help="Threads reading (and, on the GPU, staging) the next partitions "
                   "(0: 4 on the GPU, 2 on the CPU).")
@click.option("--host-workers", type=int, default=0, show_default=True,
              help="GPU: processes that read partitions and prepare their rows and loss terms "
                   "for the loaders (0: half the cores, at most 6; N: N processes; -1: none, "
                   "the loader threads do it).")
@click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
              help="GPU: replay each small partition's forward and backward as one CUDA graph: "
                   "a cached one's from the second epoch on, a streamed one's padded to a size "
                   "class (same math, less launch overhead).")
@click.option("--gpu-cache/--no-gpu-cache", default=True, show_default=True,
              help="GPU: keep staged partitions on the device (within an eighth of the budget) "
                   "for later epochs; without, every epoch streams them from the store, as a "
                   "trie larger than the device does.")
@click.option("--shuffle", is_flag=True, help="Visit partitions in a seeded random order.")
def train_cmd(store: str, recipe: str | None, **kw) -> None:
    """Train on the trie store STORE (its radix layer) with the exact aggregated gradient."""
    from agpt.train.workers import start_early
    start_early(kw["device"], kw["host_workers"], store)    # it loads beside the imports below
    from agpt.train.run import SEED_RECIPE, train_trie
    from agpt.train.trie_trainer import TrieArgs
    from pipelines.build import parse_bytes

    rec = SEED_RECIPE if recipe == "seed" else {}

    def pick(name: str, default):
        v = kw.get(name)
        return v if v is not None else rec.get(name, default)

    args = TrieArgs(epochs=pick("epochs", 1), step=pick("step", "partition"),
                    gradient=kw["gradient"], mass_weight=pick("mass_weight", "linear"),
                    entropy_lambda=pick("entropy_lambda", 0.0),
                    memory_budget=parse_bytes(kw["memory_budget"]),
                    gpu_memory_budget=parse_bytes(kw["gpu_memory_budget"]),
                    loaders=kw["loaders"], host_workers=kw["host_workers"], cuda_graphs=kw["cuda_graphs"], gpu_cache=kw["gpu_cache"],
                    shuffle=kw["shuffle"],
                    seed=kw["seed"])
    res = train_trie(store, kw["out"], args, _optim(rec, kw), init=kw["init"], model=kw["model"],
                     resume=kw["resume"], auto=pick("auto_lr", False),
                     warmup_epochs=pick("warmup_epochs", 0.0), device=kw["device"],
                     dtype=kw["dtype"], metrics=kw["metrics"], until_epoch=kw["until_epoch"],
                     progress=not kw["quiet"], force=kw["force"], tf32=kw["tf32"])
    click.echo(json.dumps(res))


@cli.command("train-window")
@click.argument("store")
@_common
@click.option("--seq-len", type=int, default=32, show_default=True, help="Window length.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Windows per update.")
@click.option("--starts", type=click.Choice(["random", "all"]), default="random", show_default=True,
              help="random: uniform draws per batch; all: every start once per epoch.")
@click.option("--epochs", type=int, default=1, show_default=True, help="With --starts all.")
@click.option("--steps", type=int, default=1000, show_default=True, help="With --starts random.")
@click.option("--seconds", type=float, default=None, help="Stop (checkpointed) after this wall time.")
@click.option("--checkpoint-every", type=int, default=1000, show_default=True,
              help="Updates between checkpoints (and at every epoch end).")
def train_window_cmd(store: str, **kw) -> None:
    """Train on ordinary windows of STORE's training tokens (corpus or trie store)."""
    from agpt.train.run import train_window
    from agpt.train.window_trainer import WindowArgs

    args = WindowArgs(seq_len=kw["seq_len"], batch_size=kw["batch_size"], starts=kw["starts"],
                      epochs=kw["epochs"], steps=kw["steps"], seed=kw["seed"],
                      checkpoint_every=kw["checkpoint_every"])
    res = train_window(store, kw["out"], args, _optim({}, kw), init=kw["init"],
                       model=kw["model"], resume=kw["resume"],
                       warmup_epochs=kw["warmup_epochs"] or 0.0, device=kw["device"],
                       dtype=kw["dtype"], metrics=kw["metrics"], seconds=kw["seconds"],
                       progress=not kw["quiet"], force=kw["force"], tf32=kw["tf32"])
    click.echo(json.dumps(res))
