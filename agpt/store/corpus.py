"""The corpus store: a tokenized text as a Zarr v3 group (SPEC §3, §5; docs/FORMAT.md).

Layout of a corpus group (a store root written by `agpt ingest`, or the `corpus/` subgroup a
trie store embeds so that it is self-contained):

- attribute `agpt`: `header(CORPUS_KIND, ...)` plus tokenizer, vocab, vocab_size, token_dtype,
  n_tokens, train_end (tokens [0, train_end) train, [train_end, n_tokens) are held out),
  holdout_fraction, documents, n_documents, corpus_sha256, sources (at most MAX_SOURCES
  entries {path, bytes, tokens}) and n_sources;
- array `tokens`: 1-D, dtype token_dtype, chunked and sharded by the shared format helpers;
- array `doc_starts`: int64 offset of each document's first token ([0] for one stream).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np
import zarr

from agpt.errors import StoreFormatError
from agpt.store.format import (
    CHUNK,
    CORPUS_KIND,
    SHARD,
    STATUS_BUILDING,
    ShardEncoder,
    check_header,
    create_array,
    mark_complete,
    open_root,
    read_array,
    write_array,
)
from agpt.tokenize import Tokenizer

#: sources listed by name in the attributes; longer lists keep only the count (n_sources).
MAX_SOURCES = 10_000

#: chunk/shard lengths of `tokens`; module attributes so tests can shrink them.
TOKEN_CHUNK = CHUNK
TOKEN_SHARD = SHARD


class CorpusStore:
    """Read access to a finished corpus group (a store root or an embedded subgroup)."""

    def __init__(self, group: zarr.Group, url: str, meta: Mapping[str, Any]) -> None:
        self.group = group
        self.url = url
        self.meta = dict(meta)
        self._tokenizer: Tokenizer | None = None
        self._doc_starts: np.ndarray | None = None
        self._check()

    @classmethod
    def from_group(cls, group: zarr.Group, url: str, require_complete: bool = True) -> CorpusStore:
        """Wrap an open group after checking its header (kind, version, completion)."""
        return cls(group, url, check_header(group, CORPUS_KIND, url, require_complete))

    def _check(self) -> None:
        """Cheap consistency checks (metadata only) so a damaged store fails at open."""
        m = self.meta
        try:
            n, tr, vs = int(m["n_tokens"]), int(m["train_end"]), int(m["vocab_size"])
            dtype = np.dtype(m["token_dtype"])
            arr = self.group["tokens"]
            self.group["doc_starts"]  # noqa: B018  (presence check)
        except (KeyError, TypeError, ValueError) as e:
            raise StoreFormatError(f"{self.url}: corpus is missing {e}; the store is damaged: "
                                   "ingest it again") from e
        if arr.shape != (n,) or arr.dtype != dtype or not 0 <= tr <= n or len(m["vocab"]) != vs:
            raise StoreFormatError(f"{self.url}: corpus attributes disagree with its arrays; the "
                                   "store is damaged: ingest it again")

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_meta(self.meta)
        return self._tokenizer

    @property
    def vocab(self) -> list[int]:
        return list(self.meta["vocab"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["token_dtype"])

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def train_end(self) -> int:
        """Tokens [0, train_end) train; [train_end, n_tokens) are held out for perplexity."""
        return int(self.meta["train_end"])

    @property
    def corpus_sha256(self) -> str:
        return str(self.meta["corpus_sha256"])

    @property
    def doc_starts(self) -> np.ndarray:
        """int64 offset of each document's first token."""
        if self._doc_starts is None:
            self._doc_starts = read_array(self.group, "doc_starts", self.url).astype(np.int64)
        return self._doc_starts

    def tokens(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Tokens [start, stop) (clipped to the stream), read chunk by chunk from the store."""
        n = self.n_tokens
        stop = n if stop is None else min(max(int(stop), 0), n)
        start = min(max(int(start), 0), stop)
        return read_array(self.group, "tokens", self.url, slice(start, stop))

    def train_tokens(self) -> np.ndarray:
        return self.tokens(0, self.train_end)

    def heldout_tokens(self) -> np.ndarray:
        return self.tokens(self.train_end)

    def train_documents(self) -> np.ndarray:
        """(k, 2) int64 [start, end) of each document clipped to [0, train_end); empties dropped.

        No trie context may cross a document boundary, and held-out tokens never enter the trie.
        """
        starts = self.doc_starts
        ends = np.append(starts[1:], self.n_tokens)
        spans = np.stack([np.minimum(starts, self.train_end), np.minimum(ends, self.train_end)], 1)
        return spans[spans[:, 1] > spans[:, 0]].astype(np.int64).reshape(-1, 2)

    def __repr__(self) -> str:
        return (f"CorpusStore({self.url!r}, n_tokens={self.n_tokens}, train_end={self.train_end}, "
                f"tokenizer={self.meta['tokenizer']!r}, vocab_size={self.vocab_size})")


def open_corpus(url: str, storage_options: Mapping[str, Any] | None = None) -> CorpusStore:
    """Open a finished corpus store; missing, foreign, old or unfinished -> StoreFormatError."""
    return CorpusStore.from_group(open_root(url, "r", storage_options), url)


class BlockWriter:
    """Fills a 1-D array front to back in whole shards, so each shard file is written once.

    Writing small pieces straight into a sharded array would rewrite (read, merge, re-encode)
    the same shard over and over; buffering one shard's worth makes every write a whole shard.
    With `inflight` > 0, up to that many shards are compressed and written in background
    threads while the caller produces the next ones; use the writer as a context manager then,
    so that an exception waits for (or cancels) those writes before the caller goes on.
    """

    def __init__(self, arr: zarr.Array, inflight: int = 0) -> None:
        self.arr = arr
        self.n = int(arr.shape[0])
        block = (arr.shards or arr.chunks)[0]
        self.block = max(1, min(int(block), self.n))
        self.buf = np.empty(self.block, dtype=arr.dtype)
        # whole shards are encoded directly (same bytes as Zarr writes, a fraction of the cost)
        self.enc = ShardEncoder.for_array(arr) if arr.shards else None
        if self.enc is not None and self.block != self.enc.shard and self.n > self.enc.shard:
            self.enc = None
        self.fill = 0
        self.pos = 0
        self.inflight = max(0, int(inflight))
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future] = deque()

    def __enter__(self) -> BlockWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def written(self) -> int:
        """Elements accepted so far (written, in flight or buffered)."""
        return self.pos + self.fill

    def write(self, values: np.ndarray) -> None:
        values = np.asarray(values).reshape(-1)
        if self.written + values.size > self.n:
            raise OverflowError(f"{self.written + values.size} elements for an array of {self.n}")
        i = 0
        while i < values.size:
            k = min(self.block - self.fill, values.size - i)
            self.buf[self.fill:self.fill + k] = values[i:i + k]
            self.fill += k
            i += k
            if self.fill == self.block:
                self.flush()

    def flush(self) -> None:
        """Write the buffered elements (in the background when `inflight` > 0)."""
        if not self.fill:
            return
        sel = slice(self.pos, self.pos + self.fill)
        if self.enc is not None:
            write = partial(self.enc.write, self.pos // self.enc.shard)
        else:
            write = partial(self.arr.__setitem__, sel)
        if not self.inflight:
            write(self.buf[:self.fill])
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.inflight, thread_name_prefix="agpt-write")
            while len(self._pending) >= self.inflight:
                self._pending.popleft().result()
            self._pending.append(self._pool.submit(write, self.buf[:self.fill]))
            self.buf = np.empty(self.block, dtype=self.arr.dtype)
        self.pos += self.fill
        self.fill = 0

    def close(self) -> None:
        """Write the last partial block and wait for every write; the array must now be full."""
        try:
            self.flush()
            while self._pending:
                self._pending.popleft().result()
        finally:
            self.abort()
        if self.pos != self.n:
            raise OverflowError(f"wrote {self.pos} elements into an array of {self.n}")

    def abort(self) -> None:
        """Cancel queued writes and wait for running ones: nothing lands after this returns."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()


def create_corpus_group(group: zarr.Group, meta: Mapping[str, Any], doc_starts: np.ndarray
                        ) -> BlockWriter:
    """Start a corpus in `group`: header (status building), doc_starts, an empty `tokens` array.

    The caller streams the tokens through the returned writer (a context manager, writing two
    shards in the background), then calls `mark_complete(group, ...)`; until then the group
    never opens as a corpus.
    """
    meta = dict(meta)
    meta["status"] = STATUS_BUILDING
    group.attrs["agpt"] = meta
    write_array(group, "doc_starts", np.asarray(doc_starts, dtype=np.int64))
    arr = create_array(group, "tokens", int(meta["n_tokens"]), np.dtype(meta["token_dtype"]),
                       chunk=TOKEN_CHUNK, shard=TOKEN_SHARD)
    return BlockWriter(arr, inflight=2)


def copy_corpus(src: CorpusStore, dst_group: zarr.Group, name: str = "corpus") -> CorpusStore:
    """Write an identical corpus as subgroup `name` of `dst_group`, one shard at a time.

    Trie stores embed their corpus this way so that they are self-contained; the copy is
    marked complete only after its last token is written.
    """
    group = dst_group.create_group(name, overwrite=True)
    with create_corpus_group(group, src.meta, src.doc_starts) as writer:
        for start in range(0, src.n_tokens, writer.block):
            writer.write(src.tokens(start, start + writer.block))
    mark_complete(group)
    base = str(dst_group.store).rstrip("/")
    path = "/".join(p for p in (dst_group.path, name) if p)
    return CorpusStore.from_group(group, f"{base}/{path}")
