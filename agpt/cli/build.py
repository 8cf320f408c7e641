"""`agpt build-index` and `agpt build-radix`: corpus store -> trie store (Dask pipelines)."""

from __future__ import annotations

import gc
import json
import os

import click
import psutil

from agpt.cli import cli
from agpt.errors import AgptError


def _build_options(f):
    opts = [
        click.argument("source"),
        click.option("-o", "--out", help="Trie store to write (path or fsspec URL). Adding the "
                     "other layer to an existing store of the same corpus/parameters is allowed."),
        click.option("-D", "--max-depth", type=int, required=True, help="Depth cap D (context length)."),
        click.option("--partition", type=click.Choice(["unigram", "bigram", "auto"]),
                     default="unigram", show_default=True, help="Partition scheme (SPEC §4)."),
        click.option("--partition-budget", type=int, default=None,
                     help="auto: most start positions per partition [default: from --memory-limit]."),
        click.option("--prune-min-mass", type=int, default=0, show_default=True,
                     help="Drop nodes (and subtrees) with mass below this ..."),
        click.option("--prune-min-depth", type=int, default=0, show_default=True,
                     help="... when they are at least this deep."),
        click.option("--memory-limit", default=None,
                     help="Peak memory the build respects, e.g. 1GB [default: half the RAM]."),
        click.option("--workers", type=int, default=None, help="Parallel tasks [default: CPU count]."),
        click.option("--scheduler", default="threads", show_default=True,
                     help="threads, processes, synchronous, or tcp://host:port (Dask distributed)."),
        click.option("--work-dir", default=None,
                     help="Where out-of-core builds spill and stage (must be shared by all workers)."),
        click.option("--force", is_flag=True, help="Replace an existing store at --out."),
        click.option("--quiet", is_flag=True, help="No progress output."),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _run(layer: str, source: str, out: str | None, **kw) -> None:
    from agpt.trie.compact import is_trie_store
    from pipelines.build import BuildConfig, build_trie, parse_bytes

    if not out and not (layer == "radix" and is_trie_store(source)):
        raise AgptError("give the output store with -o/--out")
    mem = parse_bytes(kw["memory_limit"]) if kw["memory_limit"] else psutil.virtual_memory().total // 2
    cfg = BuildConfig(
        max_depth=kw["max_depth"], partition=kw["partition"], partition_budget=kw["partition_budget"],
        prune_min_mass=kw["prune_min_mass"], prune_min_depth=kw["prune_min_depth"],
        memory_limit=mem, workers=kw["workers"] or os.cpu_count() or 1, scheduler=kw["scheduler"],
        work_dir=kw["work_dir"], progress=not kw["quiet"])
    res = build_trie(source, out or source, layer, cfg, force=kw["force"])
    if kw["as_json"]:
        click.echo(json.dumps(res))
    else:
        click.echo(" ".join(f"{k}={v}" for k, v in res.items() if not isinstance(v, list)))
    # The process exits next: freezing the heap's objects spares the interpreter's final
    # garbage collections (~0.3 s once numba's compiler objects are loaded).
    gc.freeze()


@cli.command("build-index")
@_build_options
def build_index(source: str, out: str | None, **kw) -> None:
    """Build the leveled (per-depth) trie of the corpus store SOURCE into --out."""
    _run("leveled", source, out, **kw)


@cli.command("build-radix")
@_build_options
def build_radix(source: str, out: str | None, **kw) -> None:
    """Build the lossless radix trie of SOURCE into --out.

    SOURCE is a corpus store (the fast path: straight from the tokens) or a trie store with a
    leveled layer (the radix layer is then compacted from it and added to that store).
    """
    _run("radix", source, out, **kw)
