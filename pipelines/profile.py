"""Trie profile (SPEC §6): per-depth and per-partition statistics as a Dask dataframe.

The raw frame has one row per (partition, depth) pair, plus rows for the spine (partition
-1, one per spine depth, the root at depth 0). Every raw column is additive (a sum or a max),
so the per-depth and per-partition tables are plain Dask groupbys and every ratio is taken
only after aggregation; ratios of sums are exact, never means of means.

Each Dask task reads a run of consecutive partitions (at most `task_nodes` leveled nodes,
bounded by start positions x D; a bigger partition is a task of its own), expands it with
`expand` (or reads the leveled layer when the store has no radix layer) and returns only its
small row block: peak memory is `workers` tasks, never the whole trie (tinyshakespeare D=32,
27 M nodes: 0.45 GB peak RSS with one worker, 0.6 GB with two).

Statistics of a group of trie nodes (one depth, one partition, or one (partition, depth) cell):

- nodes: trie nodes (distinct contexts); internal: nodes with at least one child.
- branching: children / internal, the mean number of children of a node that has any
  (children of depth d lie at depth d+1; a spine node's children include partition roots).
  Depth-D nodes have no children, so their branching is undefined (NaN).
- mass: Σ mass(p) = training positions (next-token predictions) the nodes carry;
  mass_h{i}: log2 histogram of node masses: h0 = mass 0 (end-of-stream nodes), h1 = 1,
  h2 = 2-3, h3 = 4-7, ..., h{i} = [2^(i-1), 2^i); the last bin is open-ended.
- singleton_frac: share of nodes with mass == 1 (contexts seen once).
- entropy: mass-weighted mean over nodes of H(n(p, ·)) in nats, = Σ_p mass(p)·H(p) / Σ mass:
  the loss (nats per prediction) of a model that predicts each context's empirical
  next-token distribution: the floor of the exact trie objective's terms at that depth.
- radix edges (radix layer only): a radix node is counted at the depth of its edge's first
  token (radix_heads); mean_edge / max_edge are its edge lengths in tokens.
- memory (per partition): see `ModelShape`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd

from agpt.errors import AgptError
from agpt.store.trie import TrieStore, open_trie
from agpt.trie.plan import partition_ranges
from agpt.trie.radix import LeveledDepth, RadixTrie, expand

#: raw columns summed by the groupbys (before the histogram), and those maxed.
SUM_COLUMNS = ("nodes", "internal", "children", "mass", "singletons", "mass_entropy", "ctx",
               "radix_heads", "radix_edge_tokens")
MAX_COLUMNS = ("mass_max", "radix_edge_max")
RADIX_COLUMNS = ("radix_heads", "radix_edge_tokens", "radix_edge_max")
DEFAULT_BINS = 16
#: leveled nodes one task may expand (~40 bytes each); bounded by start positions x D, since
#: a start contributes at most D nodes. A bigger partition is a task of its own.
DEFAULT_TASK_NODES = 1 << 22


@dataclass(frozen=True)
class ModelShape:
    """The model whose training memory per partition is estimated (default: `micro`, SPEC §7).

    A simple float32 estimate of the activations kept for the backward pass of one partition:

        bytes = rows · 4 · (n_layers · (9·d_model + 2·d_ff) + d_model + 2·V)
              + Σ_rows ctx · 4 · n_layers · n_heads

    rows = the partition's leveled nodes + the spine positions above its root (len(prefix) - 1),
    which are recomputed with it (SPEC §8). Per layer and row: the residual input, LayerNorm 1
    output, q, k, v, attention output, projection output, residual after attention and
    LayerNorm 2 output (9·d_model), FFN hidden before and after ReLU (2·d_ff); then the final
    LayerNorm output (d_model) and logits plus their softmax (2·V). A row at depth k attends to
    its k ancestors-and-self (ctx = k), one probability per head and layer. Weights, optimizer
    state and allocator slack are not included. micro at V = 65: 9,480 bytes per row + 32 per
    context token.
    """

    d_model: int = 64
    n_layers: int = 2
    d_ff: int = 256
    n_heads: int | None = None  # None: d_model // 16 (micro's head size 16)

    def __post_init__(self) -> None:
        if min(self.d_model, self.n_layers, self.d_ff) < 1 or (self.n_heads or 1) < 1:
            raise AgptError("--d-model, --n-layers, --d-ff and --n-heads must be positive")

    @property
    def heads(self) -> int:
        return self.n_heads or max(1, self.d_model // 16)

    def bytes_per_row(self, vocab_size: int) -> int:
        return 4 * (self.n_layers * (9 * self.d_model + 2 * self.d_ff) + self.d_model
                    + 2 * vocab_size)

    def bytes_per_ctx(self) -> int:
        return 4 * self.n_layers * self.heads


@dataclass
class Profile:
    """Aggregated tables (pandas; None when not asked for) and what they were computed from."""

    depth: pd.DataFrame | None
    partition: pd.DataFrame | None
    source_layer: str
    info: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Raw rows: NumPy statistics of a group of nodes
# ---------------------------------------------------------------------------------------------

def hist_columns(bins: int) -> list[str]:
    return [f"mass_h{i}" for i in range(bins)]


def raw_meta(bins: int) -> pd.DataFrame:
    """The empty frame that fixes the raw columns and dtypes (Dask's `meta`)."""
    cols: dict[str, Any] = {"partition": np.int64, "depth": np.int64}
    for c in SUM_COLUMNS + MAX_COLUMNS:
        cols[c] = np.float64 if c == "mass_entropy" else np.int64
    for c in hist_columns(bins):
        cols[c] = np.int64
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in cols.items()})


def mass_bin(mass: np.ndarray, bins: int) -> np.ndarray:
    """Histogram bin of each mass: 0 -> 0, else floor(log2 m) + 1, capped at bins - 1."""
    _, exp = np.frexp(np.asarray(mass, dtype=np.float64))  # m = f·2^e, f in [0.5, 1)
    return np.minimum(exp.astype(np.int64), bins - 1)


def node_stats(group: np.ndarray, n_groups: int, mass: np.ndarray, children: np.ndarray,
               count_ptr: np.ndarray, count_value: np.ndarray, bins: int) -> dict[str, np.ndarray]:
    """Additive statistics of nodes split into `n_groups` groups (group[i] = node i's group)."""
    mass = np.asarray(mass, dtype=np.int64)
    n = len(mass)

    def total(w: np.ndarray | None = None) -> np.ndarray:
        return np.bincount(group, weights=w, minlength=n_groups)

    # Σ_p mass·H(p) = Σ_p [m log m - Σ_x c log c]: no per-node division needed.
    cv = np.asarray(count_value, dtype=np.float64)
    entry_node = np.repeat(np.arange(n), np.diff(count_ptr))
    clogc = np.bincount(entry_node, weights=cv * np.log(np.maximum(cv, 1)), minlength=n)
    mf = mass.astype(np.float64)
    ent = np.maximum(mf * np.log(np.maximum(mf, 1)) - clogc, 0.0)
    mass_max = np.zeros(n_groups, dtype=np.int64)
    np.maximum.at(mass_max, group, mass)
    hist = np.bincount(group * bins + mass_bin(mass, bins), minlength=n_groups * bins)
    return {
        "nodes": total().astype(np.int64),
        "internal": total(children > 0).astype(np.int64),
        "children": total(children).astype(np.int64),
        "mass": np.bincount(group, weights=mf, minlength=n_groups).round().astype(np.int64),
        "singletons": total(mass == 1).astype(np.int64),
        "mass_entropy": total(ent),
        "mass_max": mass_max,
        "hist": hist.reshape(n_groups, bins),
    }


def _frame(partition: np.ndarray, depth: np.ndarray, cols: dict[str, np.ndarray], bins: int,
           ) -> pd.DataFrame:
    data: dict[str, Any] = {"partition": partition.astype(np.int64), "depth": depth.astype(np.int64)}
    hist = cols.pop("hist")
    for c in SUM_COLUMNS + MAX_COLUMNS:
        data[c] = cols[c]
    for i, c in enumerate(hist_columns(bins)):
        data[c] = hist[:, i].astype(np.int64)
    return pd.DataFrame(data)[list(raw_meta(bins).columns)]


def level_rows(p0: int, levels: list[LeveledDepth], rt: RadixTrie | None, bins: int
               ) -> pd.DataFrame:
    """Rows (partition, depth) for depths 1..D of consecutive partitions p0, p0+1, ...

    `levels[k-1]` holds depth k of these partitions (parents index depth k-1's nodes, part_ptr
    splits them); `rt` is their radix trie when the store has one.
    """
    D = len(levels)
    P = len(levels[0].part_ptr) - 1
    blocks = []
    if rt is not None:
        rpart = np.repeat(np.arange(P), np.diff(rt.part_ptr))
        key = rpart * (D + 1) + rt.head.astype(np.int64)
        elen = np.diff(rt.edge_ptr)
        heads = np.bincount(key, minlength=P * (D + 1)).reshape(P, D + 1)
        etok = np.bincount(key, weights=elen, minlength=P * (D + 1)).reshape(P, D + 1)
        emax = np.zeros(P * (D + 1), dtype=np.int64)
        np.maximum.at(emax, key, elen)
        emax = emax.reshape(P, D + 1)
    for k in range(1, D + 1):
        L = levels[k - 1]
        children = np.zeros(L.n_nodes, dtype=np.int64)
        if k < D:
            par = levels[k].parent
            children = np.bincount(par[par >= 0], minlength=L.n_nodes)
        part = np.repeat(np.arange(P), np.diff(L.part_ptr))
        cols = node_stats(part, P, L.mass, children, L.count_ptr, L.count_value, bins)
        cols["ctx"] = cols["nodes"] * k
        if rt is not None:
            cols["radix_heads"] = heads[:, k]
            cols["radix_edge_tokens"] = etok[:, k].round().astype(np.int64)
            cols["radix_edge_max"] = emax[:, k]
        else:
            for c in RADIX_COLUMNS:
                cols[c] = np.zeros(P, dtype=np.int64)
        blocks.append(_frame(np.arange(p0, p0 + P), np.full(P, k), cols, bins))
    return pd.concat(blocks, ignore_index=True)


def partition_rows(store: TrieStore, a: int, b: int, bins: int) -> pd.DataFrame:
    """One task: the rows of partitions a..b-1, read and expanded here (bounded memory)."""
    if "radix" in store.layers:
        rt = store.radix_partitions(a, b)
        return level_rows(a, expand(rt, store.max_depth), rt, bins)
    return pd.concat([level_rows(p, store.leveled_partition(p), None, bins) for p in range(a, b)],
                     ignore_index=True)


def spine_rows(store: TrieStore, bins: int) -> pd.DataFrame:
    """Rows (partition -1, depth) of the spine: the root and the prefixes above partition roots."""
    sp = store.spine()
    S = len(sp.depth)
    depth = sp.depth.astype(np.int64)
    n_groups = int(depth.max(initial=0)) + 1
    children = np.bincount(sp.parent[sp.parent >= 0], minlength=S) \
        + np.bincount(store.spine_parent_of_partition(), minlength=S)
    cols = node_stats(depth, n_groups, sp.mass, children, sp.count_ptr, sp.count_value, bins)
    cols["ctx"] = cols["nodes"] * np.arange(n_groups)
    for c in RADIX_COLUMNS:
        cols[c] = np.zeros(n_groups, dtype=np.int64)
    df = _frame(np.full(n_groups, -1), np.arange(n_groups), cols, bins)
    return df[df["nodes"] > 0].reset_index(drop=True)


def task_ranges(sizes: np.ndarray, task_starts: int, min_tasks: int) -> list[tuple[int, int]]:
    """Consecutive partition ranges of at most `task_starts` (>= min_tasks ranges)."""
    return partition_ranges(sizes, task_starts, min_tasks)


def raw_frame(store: TrieStore, bins: int = DEFAULT_BINS, task_nodes: int = DEFAULT_TASK_NODES,
              min_tasks: int = 1) -> dd.DataFrame:
    """The lazy raw frame: one Dask partition per task, plus one for the spine."""
    if bins < 2:
        raise AgptError(f"--bins must be at least 2 (mass 0 and the rest), got {bins}")
    if not set(store.layers) & {"radix", "leveled"}:
        raise AgptError(f"{store.url} has no complete layer to profile: run agpt build-radix")
    st = dask.delayed(store, pure=False)
    parts = [dask.delayed(spine_rows, pure=False)(st, bins)]
    parts += [dask.delayed(partition_rows, pure=False)(st, a, b, bins)
              for a, b in task_ranges(np.asarray(store.partition_sizes),
                                         max(1, task_nodes // store.max_depth), min_tasks)]
    return dd.from_delayed(parts, meta=raw_meta(bins), verify_meta=False)


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------

def _agg_spec(bins: int) -> dict[str, str]:
    spec = {c: "sum" for c in SUM_COLUMNS}
    spec.update({c: "max" for c in MAX_COLUMNS})
    spec.update({c: "sum" for c in hist_columns(bins)})
    return spec


def _ratio(a: pd.Series, b: pd.Series) -> pd.Series:
    return a.astype(np.float64) / b.where(b > 0).astype(np.float64)


def _common(df: pd.DataFrame, radix: bool, bins: int) -> dict[str, pd.Series]:
    out = {
        "nodes": df["nodes"], "internal": df["internal"],
        "branching": _ratio(df["children"], df["internal"]),
        "mass": df["mass"], "mass_mean": _ratio(df["mass"], df["nodes"]),
        "mass_max": df["mass_max"], "singletons": df["singletons"],
        "singleton_frac": _ratio(df["singletons"], df["nodes"]),
        "entropy": _ratio(df["mass_entropy"], df["mass"]),
    }
    if radix:
        out.update({"radix_heads": df["radix_heads"], "radix_edge_tokens": df["radix_edge_tokens"],
                    "mean_edge": _ratio(df["radix_edge_tokens"], df["radix_heads"]),
                    "max_edge": df["radix_edge_max"]})  # 0 where no edge starts
    out.update({c: df[c] for c in hist_columns(bins)})
    return out


def depth_table(agg: pd.DataFrame, radix: bool, bins: int) -> pd.DataFrame:
    """Per-depth table from the summed raw columns (index = depth)."""
    agg = agg.sort_index()
    return pd.DataFrame({"depth": agg.index.astype(np.int64), **_common(agg, radix, bins)}
                        ).reset_index(drop=True)


def partition_table(agg: pd.DataFrame, store: TrieStore, model: ModelShape, radix: bool,
                    bins: int) -> pd.DataFrame:
    """Per-partition table, every partition present (index = partition id)."""
    P = store.n_partitions
    agg = agg.reindex(np.arange(P), fill_value=0)
    tok = store.corpus.tokenizer
    prefixes = store.partition_prefixes()
    plen = pd.Series([len(x) for x in prefixes], index=agg.index, dtype=np.int64)
    spine_rows_ = plen - 1
    rows = agg["nodes"] + spine_rows_
    ctx = agg["ctx"] + plen * (plen - 1) // 2  # spine rows sit at depths 1 .. len-1
    est = rows * model.bytes_per_row(store.vocab_size) + ctx * model.bytes_per_ctx()
    common = {"radix_nodes" if k == "radix_heads" else k: v
              for k, v in _common(agg, radix, bins).items()}
    df = pd.DataFrame({
        "partition": agg.index.astype(np.int64),
        "prefix": pd.Series([show_tokens(tok, x) for x in prefixes], index=agg.index, dtype=object),
        "prefix_len": plen,
        "starts": pd.Series(np.asarray(store.partition_sizes, dtype=np.int64), index=agg.index),
        "nodes": common.pop("nodes"),
        "spine_rows": spine_rows_, "rows": rows, "est_bytes": est.astype(np.int64),
        **common,
    })
    return df.reset_index(drop=True)


def show_tokens(tok: Any, ids: tuple[int, ...]) -> str:
    """A prefix as a Python literal ('\\n', ' ', b'\\x80') so that table cells stay one line."""
    if tok.name == "byte":
        return repr(tok.decode_bytes(list(ids)))
    return repr(tok.decode(list(ids)))


def profile(url: str | TrieStore, by: str = "both", bins: int = DEFAULT_BINS,
            model: ModelShape | None = None, workers: int | None = None,
            task_nodes: int = DEFAULT_TASK_NODES, progress: bool = False) -> Profile:
    """Profile a trie store: per-depth and/or per-partition tables (pandas, aggregated by Dask).

    Both groupbys are computed in one `dask.compute`, so each partition is read and expanded
    once; the threads scheduler runs `workers` tasks at a time.
    """
    if by not in ("depth", "partition", "both"):
        raise AgptError(f"--by must be depth, partition or both, got {by!r}")
    store = open_trie(url) if isinstance(url, str) else url
    model = model or ModelShape()
    workers = workers or 1
    raw = raw_frame(store, bins, task_nodes, min_tasks=workers)
    spec = _agg_spec(bins)
    todo = {}
    if by in ("depth", "both"):
        todo["depth"] = raw.groupby("depth").agg(spec)
    if by in ("partition", "both"):
        todo["partition"] = raw[raw["partition"] >= 0].groupby("partition").agg(spec)
    kw: dict[str, Any] = {"scheduler": "threads", "num_workers": workers}
    if progress:
        from dask.diagnostics import ProgressBar
        with ProgressBar(out=sys.stderr, minimum=2):
            results = dask.compute(*todo.values(), **kw)
    else:
        results = dask.compute(*todo.values(), **kw)
    got = dict(zip(todo, results, strict=True))
    radix = "radix" in store.layers
    info = {"store": store.url, "max_depth": store.max_depth, "vocab_size": store.vocab_size,
            "partitions": store.n_partitions, "scheme": store.meta.get("partitions", {}).get("scheme"),
            "layer": "radix" if radix else "leveled", "bins": bins,
            "model": {"d_model": model.d_model, "n_layers": model.n_layers, "d_ff": model.d_ff,
                      "n_heads": model.heads,
                      "bytes_per_row": model.bytes_per_row(store.vocab_size),
                      "bytes_per_ctx": model.bytes_per_ctx()}}
    return Profile(
        depth=depth_table(got["depth"], radix, bins) if "depth" in got else None,
        partition=partition_table(got["partition"], store, model, radix, bins)
        if "partition" in got else None,
        source_layer=info["layer"], info=info)


# ---------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------

def _fmt(v: Any, col: str) -> str:
    if isinstance(v, str):
        return v
    if v is None or v is pd.NA or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    if col == "est_bytes":
        return f"{v / 2**20:,.1f}"
    if col == "singleton_frac":
        return f"{100 * v:.1f}%"
    if isinstance(v, float | np.floating):
        return f"{v:,.3f}"
    return f"{int(v):,}"


def format_table(df: pd.DataFrame, columns: list[str] | None = None,
                 headers: dict[str, str] | None = None, max_rows: int | None = None) -> str:
    """An aligned plain-text table (strings left-aligned, numbers right-aligned)."""
    columns = [c for c in (columns or list(df.columns)) if c in df.columns]
    headers = headers or {}
    shown = df if max_rows is None or len(df) <= max_rows else df.head(max_rows)
    cells = [[_fmt(v, c) for v in shown[c].tolist()] for c in columns]
    names = [headers.get(c, c) for c in columns]
    widths = [max([len(n)] + [len(x) for x in col]) for n, col in zip(names, cells, strict=True)]
    left = [not pd.api.types.is_numeric_dtype(df[c]) for c in columns]

    def line(vals: list[str]) -> str:
        return "  ".join(v.ljust(w) if lf else v.rjust(w)
                         for v, w, lf in zip(vals, widths, left, strict=True)).rstrip()

    out = [line(names)]
    out += [line([col[i] for col in cells]) for i in range(len(shown))]
    if len(shown) < len(df):
        out.append(f"... {len(df) - len(shown):,} more rows (write them all with --csv/--parquet)")
    return "\n".join(out)


DEPTH_COLUMNS = ["depth", "nodes", "branching", "mass", "mass_max", "singleton_frac", "entropy",
                 "radix_heads", "mean_edge", "max_edge"]
PARTITION_COLUMNS = ["partition", "prefix", "starts", "nodes", "rows", "est_bytes", "branching",
                     "singleton_frac", "entropy", "radix_nodes", "mean_edge", "max_edge"]
HEADERS = {"singleton_frac": "singleton", "entropy": "entropy_nats", "est_bytes": "est_MiB",
           "radix_heads": "radix_heads", "mass_max": "max_mass"}


def hist_header(bins: int) -> str:
    """Bin labels: h0=0, h1=1, h2=2-3, ..., the last open-ended (h15=>=16384)."""
    def label(i: int) -> str:
        if i == 0:
            return "0"
        if i == bins - 1:
            return f">={1 << (i - 1)}"
        return "1" if i == 1 else f"{1 << (i - 1)}-{(1 << i) - 1}"
    return ", ".join(f"h{i}={label(i)}" for i in range(bins))


def render(prof: Profile, max_rows: int | None = 100) -> str:
    """The report `agpt profile` prints."""
    i = prof.info
    m = i["model"]
    out = [f"{i['store']}: D={i['max_depth']}, V={i['vocab_size']}, {i['partitions']:,} "
           f"{i['scheme']} partitions; statistics from the {i['layer']} layer"
           + ("" if i["layer"] == "radix" else " (no radix layer: edge columns omitted)")]
    bins = i["bins"]
    hist = hist_columns(bins)
    if prof.depth is not None:
        out += ["", "per depth (depth 0 = root; branching = children per node with children; "
                "entropy = mass-weighted next-token entropy, nats)",
                format_table(prof.depth, DEPTH_COLUMNS, HEADERS)]
        out += ["", f"mass histogram per depth (nodes per log2 mass bin: {hist_header(bins)})",
                format_table(prof.depth.rename(columns=lambda c: c.replace("mass_", "")),
                             ["depth"] + [c.replace("mass_", "") for c in hist])]
    if prof.partition is not None:
        out += ["", f"per partition (rows = nodes + spine rows above the root; est_MiB = "
                f"training activations of a {m['n_layers']}-layer d_model {m['d_model']} d_ff "
                f"{m['d_ff']} model: {m['bytes_per_row']:,} B/row + {m['bytes_per_ctx']} B per "
                "context token)",
                format_table(prof.partition, PARTITION_COLUMNS, HEADERS, max_rows)]
        p = prof.partition
        if len(p):
            big = p.loc[p["est_bytes"].idxmax()]
            out.append(f"largest partition {int(big['partition'])} {big['prefix']}: "
                       f"{int(big['rows']):,} rows, ~{big['est_bytes'] / 2**20:,.1f} MiB; "
                       f"all partitions {int(p['rows'].sum()):,} rows")
    return "\n".join(out)
