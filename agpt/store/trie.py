"""The trie store: one Zarr v3 group per trie (layout in docs/FORMAT.md).

    corpus/       a copy of the corpus store (tokens, documents, vocabulary, held-out range)
    spine/        the root and every prefix above the partition roots (uncompacted)
    partitions/   prefixes, sizes, spine parent, node ranges in each layer
    radix/        partition-major, depth-first preorder: one partition = one contiguous slice
    leveled/      depth-major, lexicographic within a depth: one depth = one slice,
                  one partition = one slice per depth

Writers append in order through `BlockWriter`, which writes whole shards only, so no two
writes ever touch one shard concurrently; the store opens only once status is complete.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from agpt.errors import StoreFormatError
from agpt.store.corpus import BlockWriter, CorpusStore, copy_corpus
from agpt.store.format import (
    TRIE_KIND,
    check_header,
    create_array,
    header,
    mark_complete,
    open_root,
    read_arrays,
    write_array,
)
from agpt.trie.plan import Plan
from agpt.trie.radix import LeveledDepth, RadixTrie

LAYERS = ("radix", "leveled")
COUNT_FIELDS = ("count_ptr", "count_token", "count_value")


#: shards each array's writer compresses in the background while the caller goes on
WRITE_INFLIGHT = 2


def Appender(group: zarr.Group, name: str, total: int, dtype: Any) -> BlockWriter:  # noqa: N802
    """A new array filled front to back in whole shards (see BlockWriter), compressing
    WRITE_INFLIGHT shards in background threads; close() or abort() it (see _closing)."""
    return BlockWriter(create_array(group, name, total, dtype), inflight=WRITE_INFLIGHT)


class _closing:  # noqa: N801
    """Close every appender on success; on an error, cancel and wait for their writes."""

    def __init__(self, appenders: dict[str, BlockWriter]):
        self.appenders = appenders

    def __enter__(self) -> dict[str, BlockWriter]:
        return self.appenders

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            for a in self.appenders.values():
                a.close()
        else:
            for a in self.appenders.values():
                a.abort()


@dataclass
class Spine:
    depth: np.ndarray
    token: np.ndarray
    parent: np.ndarray
    mass: np.ndarray
    count_ptr: np.ndarray
    count_token: np.ndarray
    count_value: np.ndarray


class TrieStore:
    """Read access to a complete trie store: partitions, layers and the embedded corpus."""

    def __init__(self, group: zarr.Group, url: str):
        self.group = group
        self.url = url
        self.meta = check_header(group, TRIE_KIND, url)
        self.max_depth: int = int(self.meta["max_depth"])
        self.layers: tuple[str, ...] = tuple(
            k for k, v in self.meta.get("layers", {}).items() if v.get("status") == "complete")
        self.corpus = CorpusStore.from_group(group["corpus"], f"{url}/corpus")
        self.vocab_size = self.corpus.vocab_size
        self._cache: dict[str, np.ndarray] = {}
        self._arrays: dict[str, zarr.Array] = {}

    def _read(self, sels: dict[str, Any]) -> dict[str, np.ndarray]:
        """Parts of several arrays in one Zarr round trip (format.read_arrays)."""
        return read_arrays(self.group, sels, self.url, self._arrays)

    # -- small tables (cached) ------------------------------------------------------------
    def _small(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = self._read({name: Ellipsis})[name]
        return self._cache[name]

    @property
    def n_partitions(self) -> int:
        return len(self._small("partitions/size"))

    @property
    def partition_sizes(self) -> np.ndarray:
        """Start positions under each partition root (its build size)."""
        return self._small("partitions/size")

    def partition_prefix(self, p: int) -> tuple[int, ...]:
        ptr = self._small("partitions/prefix_ptr")
        return tuple(int(t) for t in self._small("partitions/prefix_tokens")[ptr[p]: ptr[p + 1]])

    def partition_prefixes(self) -> list[tuple[int, ...]]:
        return [self.partition_prefix(p) for p in range(self.n_partitions)]

    def spine(self) -> Spine:
        return Spine(*(self._small(f"spine/{f}") for f in
                       ("depth", "token", "parent", "mass", *COUNT_FIELDS)))

    def spine_parent_of_partition(self) -> np.ndarray:
        return self._small("partitions/spine_parent")

    def _need(self, layer: str) -> None:
        if layer not in self.layers:
            have = ", ".join(self.layers) or "none"
            cmd = "build-radix" if layer == "radix" else "build-index"
            raise StoreFormatError(f"{self.url} has no {layer} layer (has: {have}); run agpt {cmd}")

    # -- radix ------------------------------------------------------------------------------
    def radix_partitions(self, a: int, b: int) -> RadixTrie:
        """Partitions a..b-1 of the radix layer: I/O proportional to their size."""
        self._need("radix")
        pp = self._small("partitions/radix_ptr")
        lo, hi = int(pp[a]), int(pp[b])
        ptrs = self._read({"radix/edge_ptr": slice(lo, hi + 1), "radix/count_ptr": slice(lo, hi + 1),
                           "radix/parent": slice(lo, hi), "radix/head": slice(lo, hi),
                           "radix/mass": slice(lo, hi)})
        eptr, cptr, par = ptrs["radix/edge_ptr"], ptrs["radix/count_ptr"], ptrs["radix/parent"]
        edges = slice(int(eptr[0]), int(eptr[-1]))
        counts = slice(int(cptr[0]), int(cptr[-1]))
        data = self._read({"radix/edge_tokens": edges, "radix/count_token": counts,
                           "radix/count_value": counts})
        return RadixTrie(
            parent=np.where(par >= 0, par - lo, -1),
            head=ptrs["radix/head"],
            mass=ptrs["radix/mass"],
            edge_ptr=eptr - eptr[0],
            edge_tokens=data["radix/edge_tokens"],
            count_ptr=cptr - cptr[0],
            count_token=data["radix/count_token"],
            count_value=data["radix/count_value"],
            part_ptr=pp[a: b + 1] - lo,
        )

    def radix_rows(self) -> np.ndarray:
        """Edge positions (trainer rows) of each radix partition, without its spine prefix."""
        self._need("radix")
        if "radix_rows" not in self._cache:
            pp = self._small("partitions/radix_ptr")
            self._cache["radix_rows"] = np.diff(self._read({"radix/edge_ptr": pp})["radix/edge_ptr"])
        return self._cache["radix_rows"]

    def radix_partition(self, p: int) -> RadixTrie:
        return self.radix_partitions(p, p + 1)

    def radix(self) -> RadixTrie:
        return self.radix_partitions(0, self.n_partitions)

    # -- leveled ----------------------------------------------------------------------------
    def _leveled_slice(self, k: int, lo: int, hi: int, parent_base: int,
                       part_ptr: np.ndarray) -> LeveledDepth:
        nodes = slice(lo, hi)
        head = self._read({"leveled/count_ptr": slice(lo, hi + 1), "leveled/parent": nodes,
                           "leveled/token": nodes, "leveled/mass": nodes})
        cptr, par = head["leveled/count_ptr"], head["leveled/parent"]
        counts = slice(int(cptr[0]), int(cptr[-1]))
        data = self._read({"leveled/count_token": counts, "leveled/count_value": counts})
        return LeveledDepth(
            token=head["leveled/token"],
            parent=np.where(par >= 0, par - parent_base, -1),
            mass=head["leveled/mass"],
            count_ptr=cptr - cptr[0],
            count_token=data["leveled/count_token"],
            count_value=data["leveled/count_value"],
            part_ptr=part_ptr,
        )

    def leveled_depth(self, k: int) -> LeveledDepth:
        """All nodes of depth k outside the spine (parent indexes depth k-1's nodes)."""
        self._need("leveled")
        lp = self._small("partitions/leveled_ptr")  # (D, P+1) absolute offsets
        base = int(lp[k - 2, 0]) if k > 1 else 0
        return self._leveled_slice(k, int(lp[k - 1, 0]), int(lp[k - 1, -1]), base,
                                   lp[k - 1] - lp[k - 1, 0])

    def iter_depths(self) -> Iterator[tuple[int, LeveledDepth]]:
        for k in range(1, self.max_depth + 1):
            yield k, self.leveled_depth(k)

    def leveled_partition(self, p: int) -> list[LeveledDepth]:
        """Partition p's nodes, one LeveledDepth per depth 1..D (parents local to it)."""
        self._need("leveled")
        lp = self._small("partitions/leveled_ptr")
        out = []
        for k in range(1, self.max_depth + 1):
            lo, hi = int(lp[k - 1, p]), int(lp[k - 1, p + 1])
            base = int(lp[k - 2, p]) if k > 1 else 0
            out.append(self._leveled_slice(k, lo, hi, base, np.array([0, hi - lo])))
        return out

    def totals(self) -> dict[str, Any]:
        return dict(self.meta.get("totals", {}))


def open_trie(url: str) -> TrieStore:
    """Open a complete trie store (local path or fsspec URL)."""
    return TrieStore(open_root(url, "r"), url)


class TrieWriter:
    """Creates or resumes a trie store and writes its layers in order."""

    def __init__(self, url: str, corpus: CorpusStore, params: dict[str, Any], force: bool = False):
        self.url = url
        self.params = params
        try:
            existing = zarr.open_group(url, mode="r", zarr_format=3)
            meta = existing.attrs.get("agpt")
        except (FileNotFoundError, KeyError, ValueError):
            meta = None
        if meta is not None and not force:
            if not isinstance(meta, dict) or meta.get("format") != TRIE_KIND:
                raise StoreFormatError(f"{url} exists and is not a trie store; pass --force to replace it")
            check_header(existing, TRIE_KIND, url, require_complete=False)
            if meta.get("build") != params or meta.get("corpus_sha256") != corpus.meta["corpus_sha256"]:
                raise StoreFormatError(
                    f"{url} holds a trie built with other parameters or another corpus; "
                    "pass --force to replace it or choose another output")
            self.group = open_root(url, "r+")
            self.fresh = False
        else:
            self.group = open_root(url, "w")
            self.group.attrs["agpt"] = header(
                TRIE_KIND, max_depth=params["max_depth"], build=params,
                corpus_sha256=corpus.meta["corpus_sha256"], tokenizer=corpus.meta["tokenizer"],
                vocab_size=corpus.vocab_size, layers={}, totals={})
            copy_corpus(corpus, self.group, "corpus")
            self.fresh = True

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.group.attrs["agpt"])

    def has_layer(self, layer: str) -> bool:
        return self.meta.get("layers", {}).get(layer, {}).get("status") == "complete"

    def _update(self, **kw: Any) -> None:
        meta = self.meta
        for k, v in kw.items():
            if isinstance(v, dict) and isinstance(meta.get(k), dict):
                meta[k] = {**meta[k], **v}
            else:
                meta[k] = v
        self.group.attrs["agpt"] = meta

    def write_plan(self, plan: Plan) -> None:
        g = self.group.require_group("spine")
        write_array(g, "depth", plan.spine_depth)
        write_array(g, "token", plan.spine_token)
        write_array(g, "parent", plan.spine_parent)
        write_array(g, "mass", plan.spine_mass)
        write_array(g, "count_ptr", plan.spine_count_ptr)
        write_array(g, "count_token", plan.spine_count_token)
        write_array(g, "count_value", plan.spine_count_value)
        p = self.group.require_group("partitions")
        lens = np.array([len(x) for x in plan.prefixes], dtype=np.int64)
        write_array(p, "prefix_ptr", np.concatenate(([0], np.cumsum(lens))))
        write_array(p, "prefix_tokens", np.array([t for x in plan.prefixes for t in x], dtype=np.int64))
        write_array(p, "size", plan.sizes)
        write_array(p, "spine_parent", plan.spine_parent_of_part)
        self._update(partitions={"scheme": plan.scheme, "count": plan.n_partitions,
                                 "spine_nodes": len(plan.spine_depth),
                                 "max_prefix": int(lens.max(initial=0))})

    def write_radix(self, parts: list[RadixTrie] | Iterable[RadixTrie], sizes: dict[str, int]) -> dict:
        """Append radix pieces (consecutive partition ranges, in order); sizes gives totals.

        A list (pieces in memory) is written column-parallel; any other iterable is consumed
        one piece at a time (its pieces are loaded lazily, to bound memory).
        """
        if isinstance(parts, list):
            return self.write_radix_columns(
                len(parts), lambda i, f: getattr(parts[i], f),
                [(p.n_nodes, len(p.edge_tokens), len(p.count_value)) for p in parts],
                [p.part_ptr for p in parts], sizes)
        self._update(layers={"radix": {"status": "building"}})
        ap = self._radix_appenders(sizes)
        R, E, C = sizes["nodes"], sizes["edge_tokens"], sizes["counts"]
        with _closing(ap):
            n0 = e0 = c0 = 0
            part_ptr = [0]
            for rt in parts:
                ap["parent"].write(np.where(rt.parent >= 0, rt.parent + n0, -1))
                ap["head"].write(rt.head)
                ap["mass"].write(rt.mass)
                ap["edge_ptr"].write(rt.edge_ptr[:-1] + e0)
                ap["edge_tokens"].write(rt.edge_tokens)
                ap["count_ptr"].write(rt.count_ptr[:-1] + c0)
                ap["count_token"].write(rt.count_token)
                ap["count_value"].write(rt.count_value)
                part_ptr.extend((rt.part_ptr[1:] + n0).tolist())
                n0 += rt.n_nodes
                e0 += len(rt.edge_tokens)
                c0 += len(rt.count_value)
            ap["edge_ptr"].write(np.array([e0]))
            ap["count_ptr"].write(np.array([c0]))
        return self._finish_radix(part_ptr, R, E, C)

    def _radix_appenders(self, sizes: dict[str, int]) -> dict[str, BlockWriter]:
        g = self.group.require_group("radix")
        R, E, C = sizes["nodes"], sizes["edge_tokens"], sizes["counts"]
        tok = np.dtype(self.group["corpus/tokens"].dtype)
        return {
            "parent": Appender(g, "parent", R, np.int64), "head": Appender(g, "head", R, np.int16),
            "mass": Appender(g, "mass", R, np.int64),
            "edge_ptr": Appender(g, "edge_ptr", R + 1, np.int64),
            "edge_tokens": Appender(g, "edge_tokens", E, tok),
            "count_ptr": Appender(g, "count_ptr", R + 1, np.int64),
            "count_token": Appender(g, "count_token", C, tok),
            "count_value": Appender(g, "count_value", C, np.int64),
        }

    def _finish_radix(self, part_ptr: list[int], R: int, E: int, C: int) -> dict:
        write_array(self.group.require_group("partitions"), "radix_ptr", np.array(part_ptr, np.int64))
        totals = {"radix_nodes": R, "radix_edge_tokens": E, "radix_counts": C}
        self._update(layers={"radix": {"status": "complete"}}, totals=totals)
        return totals

    def write_radix_columns(self, n_pieces: int, column: Callable[[int, str], np.ndarray],
                            piece_sizes: list[tuple[int, int, int]], part_ptrs: list[np.ndarray],
                            sizes: dict[str, int]) -> dict:
        """Append radix pieces given column by column: column(i, field) is piece i's array.

        Each array is written by its own thread, piece after piece (reading, offsetting and
        compressing one array never waits for another's), so the writer keeps every core
        busy; piece_sizes[i] = (nodes, edge tokens, counts), part_ptrs[i] its part_ptr.
        """
        from concurrent.futures import ThreadPoolExecutor

        self._update(layers={"radix": {"status": "building"}})
        R, E, C = sizes["nodes"], sizes["edge_tokens"], sizes["counts"]
        sz = np.array(piece_sizes, dtype=np.int64).reshape(-1, 3)
        n0, e0, c0 = (np.concatenate(([0], np.cumsum(sz[:, j]))) for j in range(3))
        if (int(n0[-1]), int(e0[-1]), int(c0[-1])) != (R, E, C):
            raise ValueError(f"radix pieces hold {n0[-1]}/{e0[-1]}/{c0[-1]} nodes/edge tokens/"
                             f"counts, expected {R}/{E}/{C}")
        ap = self._radix_appenders(sizes)

        def one(f: str) -> None:
            a = ap[f]
            for i in range(n_pieces):
                x = column(i, f)
                if f == "parent":
                    x = np.where(x >= 0, x + n0[i], -1)
                elif f == "edge_ptr":
                    x = x[:-1] + e0[i]
                elif f == "count_ptr":
                    x = x[:-1] + c0[i]
                a.write(x)
                del x
            if f == "edge_ptr":
                a.write(np.array([E]))
            elif f == "count_ptr":
                a.write(np.array([C]))

        with _closing(ap), ThreadPoolExecutor(len(ap), thread_name_prefix="agpt-column") as pool:
            for fut in [pool.submit(one, f) for f in ap]:
                fut.result()
        part_ptr = [0]
        for i, pp in enumerate(part_ptrs):
            part_ptr.extend((np.asarray(pp)[1:] + n0[i]).tolist())
        return self._finish_radix(part_ptr, R, E, C)

    def write_leveled(self, pieces: list, depth_sizes: np.ndarray, count_sizes: np.ndarray) -> dict:
        """Write the leveled layer depth by depth.

        pieces[i](k) returns piece i's LeveledDepth at depth k (pieces cover consecutive
        partition ranges, in order); depth_sizes[i, k-1] / count_sizes[i, k-1] are its node
        and count-entry numbers at depth k.
        """
        self._update(layers={"leveled": {"status": "building"}})
        D = self.params["max_depth"]
        g = self.group.require_group("leveled")
        tok = np.dtype(self.group["corpus/tokens"].dtype)
        per_depth = depth_sizes.sum(axis=0)
        N, C = int(per_depth.sum()), int(count_sizes.sum())
        depth_start = np.concatenate(([0], np.cumsum(per_depth)))
        piece_off = np.concatenate((np.zeros((1, D), np.int64), np.cumsum(depth_sizes, axis=0)))
        ap = {"token": Appender(g, "token", N, tok), "parent": Appender(g, "parent", N, np.int64),
              "mass": Appender(g, "mass", N, np.int64),
              "count_ptr": Appender(g, "count_ptr", N + 1, np.int64),
              "count_token": Appender(g, "count_token", C, tok),
              "count_value": Appender(g, "count_value", C, np.int64)}
        with _closing(ap):
            c0 = 0
            rows = []
            for k in range(1, D + 1):
                row = [int(depth_start[k - 1])]
                for i, piece in enumerate(pieces):
                    L: LeveledDepth = piece(k)
                    base = depth_start[k - 2] + piece_off[i, k - 2] if k > 1 else 0
                    ap["token"].write(L.token)
                    ap["parent"].write(np.where(L.parent >= 0, L.parent + base, -1))
                    ap["mass"].write(L.mass)
                    ap["count_ptr"].write(L.count_ptr[:-1] + c0)
                    ap["count_token"].write(L.count_token)
                    ap["count_value"].write(L.count_value)
                    c0 += len(L.count_value)
                    start = depth_start[k - 1] + piece_off[i, k - 1]
                    row.extend((L.part_ptr[1:] + start).tolist())
                rows.append(row)
            ap["count_ptr"].write(np.array([c0]))
        write_array(self.group.require_group("partitions"), "leveled_ptr",
                    np.array(rows, dtype=np.int64))
        spine_per_depth = np.bincount(self.group["spine/depth"][:], minlength=D + 1)
        per = (spine_per_depth[1:D + 1] + per_depth).tolist()
        totals = {"leveled_nodes": int(N + spine_per_depth.sum()), "leveled_per_depth": per,
                  "leveled_counts": C}
        self._update(layers={"leveled": {"status": "complete"}}, totals=totals)
        return totals

    def finish(self) -> None:
        mark_complete(self.group)
