"""`agpt info` and `agpt profile`: look inside corpus and trie stores (SPEC §5, §6)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from agpt.cli import cli
from agpt.errors import AgptError, StoreFormatError
from agpt.store.format import CORPUS_KIND, TRIE_KIND, check_header, open_root

# ---------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------


def _local_path(url: str) -> Path | None:
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    return None if "://" in url else Path(url)


def disk_usage(url: str) -> tuple[int, int] | None:
    """(bytes, files) of a local store (directory or zip); None for remote URLs."""
    path = _local_path(url)
    if path is None or not path.exists():
        return None
    if path.is_file():
        return path.stat().st_size, 1
    size = files = 0
    for root, _, names in os.walk(path):
        for n in names:
            try:
                size += os.stat(os.path.join(root, n)).st_size
                files += 1
            except OSError:
                pass
    return size, files


def _corpus_fields(meta: dict[str, Any]) -> dict[str, Any]:
    n, tr = int(meta.get("n_tokens", 0)), int(meta.get("train_end", 0))
    return {
        "tokenizer": meta.get("tokenizer"), "vocab_size": meta.get("vocab_size"),
        "token_dtype": meta.get("token_dtype"), "corpus_sha256": meta.get("corpus_sha256"),
        "tokens": n, "train_tokens": tr, "heldout_tokens": n - tr,
        "holdout_fraction": meta.get("holdout_fraction"),
        "documents_mode": bool(meta.get("documents", False)),
        "n_documents": meta.get("n_documents"), "n_sources": meta.get("n_sources"),
        "n_bytes": meta.get("n_bytes"),
    }


def store_info(url: str) -> dict[str, Any]:
    """Everything `agpt info` reports, from attributes only (cheap, works on remote stores).

    An unfinished store is described too (status 'building'), so that a user can see what an
    interrupted build left; a store of another format version is refused by `check_header`.
    """
    group = open_root(url, "r")
    meta = group.attrs.get("agpt")
    kind = meta.get("format") if isinstance(meta, dict) else None
    if kind not in (CORPUS_KIND, TRIE_KIND):
        raise StoreFormatError(f"{url} is not an AGPT store (no agpt attribute with format "
                               f"{CORPUS_KIND!r} or {TRIE_KIND!r}): give a store written by agpt")
    meta = check_header(group, kind, url, require_complete=False)
    out: dict[str, Any] = {"store": url, "format": kind, "format_version": meta["format_version"],
                           "status": meta.get("status"), "writer": meta.get("writer"),
                           "created": meta.get("created")}
    if kind == CORPUS_KIND:
        out.update(_corpus_fields(meta))
    else:
        try:
            cmeta = dict(group["corpus"].attrs.get("agpt") or {})
        except KeyError:
            cmeta = {}
        out.update(_corpus_fields(cmeta))
        out["tokenizer"] = meta.get("tokenizer", out["tokenizer"])
        out["vocab_size"] = meta.get("vocab_size", out["vocab_size"])
        out["corpus_sha256"] = meta.get("corpus_sha256", out["corpus_sha256"])
        out["max_depth"] = meta.get("max_depth")
        out["build"] = meta.get("build", {})
        out["partitions"] = meta.get("partitions", {})
        out["layers"] = {k: v.get("status") for k, v in meta.get("layers", {}).items()}
        out["totals"] = meta.get("totals", {})
    du = disk_usage(url)
    out["disk_bytes"], out["disk_files"] = du if du else (None, None)
    return out


def _n(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) else "?" if v is None else str(v)


def format_info(i: dict[str, Any]) -> str:
    """The human-readable `agpt info` report."""
    rows: list[tuple[str, str]] = []
    kind = "trie" if i["format"] == TRIE_KIND else "corpus"
    rows.append(("format", f"{i['format']} version {i['format_version']}, status {i['status']}"
                 f" (written by {i.get('writer') or '?'}, {i.get('created') or '?'})"))
    rows.append(("tokenizer", f"{i['tokenizer']}, vocabulary {_n(i['vocab_size'])}, "
                 f"{i['token_dtype']} ids"))
    rows.append(("corpus sha256", str(i["corpus_sha256"])))
    n, tr, ho = i["tokens"], i["train_tokens"], i["heldout_tokens"]
    share = f" ({ho / n:.1%})" if n else ""
    rows.append(("tokens", f"{_n(n)}: train [0, {_n(tr)}), held out {_n(ho)}{share}"))
    rows.append(("documents", f"{_n(i['n_documents'])} ("
                 f"{'one per input file' if i['documents_mode'] else 'one continuous stream'}), "
                 f"{_n(i['n_sources'])} source file(s)"))
    if kind == "trie":
        rows.append(("max depth", _n(i["max_depth"])))
        b = i["build"]
        rows.append(("build", ", ".join(f"{k}={v}" for k, v in b.items()) or "?"))
        p = i["partitions"]
        rows.append(("partitions", f"{p.get('scheme', '?')}: {_n(p.get('count'))} partitions, "
                     f"{_n(p.get('spine_nodes'))} spine nodes, longest prefix "
                     f"{_n(p.get('max_prefix'))}" if p else "not planned yet"))
        rows.append(("layers", ", ".join(f"{k} ({v})" for k, v in i["layers"].items()) or "none"))
        t = i["totals"]
        if "leveled_nodes" in t:
            rows.append(("leveled nodes", f"{_n(t['leveled_nodes'])} incl. root, "
                         f"{_n(t.get('leveled_counts'))} count entries"))
            per = t.get("leveled_per_depth", [])
            rows.append(("  per depth", " ".join(_n(x) for x in per)))
        if "radix_nodes" in t:
            rows.append(("radix nodes", f"{_n(t['radix_nodes'])}, {_n(t.get('radix_edge_tokens'))}"
                         f" edge tokens, {_n(t.get('radix_counts'))} count entries"))
    if i.get("disk_bytes") is not None:
        rows.append(("on disk", f"{i['disk_bytes'] / 1e6:,.1f} MB in {_n(i['disk_files'])} file(s)"))
    w = max(len(k) for k, _ in rows)
    return "\n".join([f"{kind} store {i['store']}"] + [f"  {k.ljust(w)}  {v}" for k, v in rows])


@cli.command("info")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info_cmd(store: str, as_json: bool) -> None:
    """Summarise the corpus or trie store STORE (path or fsspec URL).

    Shows format version and status, tokenizer, corpus hash and split, and for a trie store
    its depth, build parameters, partitions, layers and node totals. Reads attributes only.
    """
    i = store_info(store)
    click.echo(json.dumps(i, indent=2) if as_json else format_info(i))


# ---------------------------------------------------------------------------------------------
# profile
# ---------------------------------------------------------------------------------------------


def _outputs(path: str, ext: str, tables: list[str]) -> dict[str, str]:
    """One file per table: PATH itself for one table, PATH-stem.<table>.<ext> for both."""
    if len(tables) == 1:
        return {tables[0]: path}
    stem = path[: -len(ext) - 1] if path.endswith("." + ext) else path
    return {t: f"{stem}.{t}.{ext}" for t in tables}


@cli.command("profile")
@click.argument("store")
@click.option("--by", type=click.Choice(["depth", "partition", "both"]), default="both",
              show_default=True, help="Which table(s) to compute.")
@click.option("--csv", "csv_path", metavar="PATH",
              help="Write the table(s) as CSV (with both tables: PATH.depth.csv, PATH.partition.csv).")
@click.option("--parquet", "parquet_path", metavar="PATH",
              help="Write the table(s) as Parquet (naming as for --csv).")
@click.option("--bins", type=int, default=16, show_default=True,
              help="Log2 mass-histogram bins (mass 0, 1, 2-3, 4-7, ...; the last is open-ended).")
@click.option("--d-model", type=int, default=64, show_default=True,
              help="Model width for the memory estimate (default: micro).")
@click.option("--n-layers", type=int, default=2, show_default=True, help="Layers, ditto.")
@click.option("--d-ff", type=int, default=256, show_default=True, help="FFN width, ditto.")
@click.option("--n-heads", type=int, default=None, help="Heads, ditto [default: d_model/16].")
@click.option("--workers", type=int, default=None, help="Parallel tasks [default: CPU count].")
@click.option("--max-rows", type=int, default=100, show_default=True,
              help="Partition rows printed (files always get all of them; 0 = all).")
@click.option("--quiet", is_flag=True, help="Print nothing (only write the files), no progress bar.")
def profile_cmd(store: str, by: str, csv_path: str | None, parquet_path: str | None, bins: int,
                d_model: int, n_layers: int, d_ff: int, n_heads: int | None, workers: int | None,
                max_rows: int, quiet: bool) -> None:
    """Per-depth and per-partition statistics of the trie store STORE (a Dask dataframe).

    Nodes, branching, mass and its log2 histogram, singleton share, next-token entropy,
    radix edge lengths and a training-memory estimate per partition; definitions are in
    `pipelines/profile.py`. Partitions are read one task at a time, so memory stays bounded.

    \b
    Example:
      agpt profile tiny.zarr --by depth
      agpt profile tiny.zarr --csv prof.csv    # prof.depth.csv and prof.partition.csv
    """
    from pipelines.profile import ModelShape, profile, render

    if workers is not None and workers < 1:
        raise AgptError("--workers must be >= 1")
    if max_rows < 0:
        raise AgptError("--max-rows must be >= 0")
    model = ModelShape(d_model=d_model, n_layers=n_layers, d_ff=d_ff, n_heads=n_heads)
    names = ["depth", "partition"] if by == "both" else [by]
    targets = [(ext, name, target) for path, ext in ((csv_path, "csv"), (parquet_path, "parquet"))
               if path for name, target in _outputs(path, ext, names).items()]
    for _, _, target in targets:  # fail before the work, not after it
        parent = os.path.dirname(os.path.abspath(target))
        if "://" not in target and not os.path.isdir(parent):
            raise AgptError(f"cannot write {target}: folder {parent} does not exist")
    meta = open_root(store, "r").attrs.get("agpt")
    if isinstance(meta, dict) and meta.get("format") == CORPUS_KIND:
        raise AgptError(f"{store} is a corpus store; profile reads a trie store: build one with "
                        f"agpt build-radix {store} -o TRIE.zarr -D DEPTH")
    prof = profile(store, by=by, bins=bins, model=model,
                   workers=workers or os.cpu_count() or 1, progress=not quiet and sys.stderr.isatty())
    tables = {"depth": prof.depth, "partition": prof.partition}
    for ext, name, target in targets:
        if ext == "csv":
            tables[name].to_csv(target, index=False)
        else:
            tables[name].to_parquet(target, index=False)
    if not quiet:
        click.echo(render(prof, max_rows=max_rows or None))
        for _, _, target in targets:
            click.echo(f"wrote {target}")
