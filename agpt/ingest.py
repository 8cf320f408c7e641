"""Ingest: text files -> corpus store (SPEC §3, §10).

Inputs are read in binary chunks through an incremental UTF-8 decoder, so a chunk boundary never
splits a character and memory stays O(chunk) for corpora larger than RAM. The `char` tokenizer
needs two passes (its vocabulary is only known after seeing every character): pass 1 collects
the vocabulary, counts and the sha256 and finds every bad-input problem before anything is
written; pass 2 encodes and writes whole shards. The store's status stays "building" until the
last write, so an interrupted ingest never opens, and rerunning it simply redoes it.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agpt.errors import AgptError, StoreFormatError
from agpt.store.corpus import MAX_SOURCES, CorpusStore, create_corpus_group
from agpt.store.format import (
    CORPUS_KIND,
    STATUS_COMPLETE,
    TRIE_KIND,
    header,
    mark_complete,
    open_root,
)
from agpt.tokenize import N_CODE_POINTS, TOKENIZERS, Tokenizer, distinct_code_points

DEFAULT_CHUNK_BYTES = 16 << 20


# -- inputs -------------------------------------------------------------------------------------

def _local_path(url: str) -> Path | None:
    """The local path of a store URL, or None for a remote (fsspec) one."""
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    return None if "://" in url else Path(url)


def _walk(root: Path) -> list[Path]:
    """Regular files under `root`, sorted; hidden files and folders (.git, .DS_Store) skipped."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            p = Path(dirpath, f)
            if not f.startswith(".") and p.is_file():
                out.append(p)
    return out


def resolve_inputs(inputs: Sequence[str | os.PathLike], exclude: Path | None = None) -> list[Path]:
    """Files named by `inputs` (files, directories, globs), in the order given.

    Directories are walked recursively in sorted order; each glob's matches are sorted. An
    input that matches nothing is an error (a typo must not silently shrink the corpus).
    """
    if not inputs:
        raise AgptError("no inputs given: name text files, directories or globs to ingest")
    ex = exclude.resolve() if exclude is not None else None
    files: list[Path] = []
    for spec in inputs:
        spec = os.fspath(spec)
        p = Path(spec)
        if p.exists():
            matches = [p]
        elif glob.has_magic(spec):
            matches = [Path(m) for m in sorted(glob.glob(spec, recursive=True))]
        else:
            raise AgptError(f"input {spec} does not exist: check the path")
        found = []
        for m in matches:
            found.extend(_walk(m) if m.is_dir() else [m] if m.is_file() else [])
        if ex is not None:
            found = [f for f in found if ex not in f.resolve().parents]
        if not found:
            raise AgptError(f"input {spec} matched no files: check the path or pattern")
        files.extend(found)
    return files


def _read_chunks(path: Path, chunk_bytes: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while raw := f.read(chunk_bytes):
            yield raw


def _decode_chunks(path: Path, chunk_bytes: int, check_nul: bool) -> Iterator[tuple[bytes, str]]:
    """(raw bytes, decoded text) per chunk; a UTF-8 sequence split by a boundary is carried over."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset = 0  # file offset of the current raw chunk
    for raw in _read_chunks(path, chunk_bytes):
        if check_nul and (i := raw.find(b"\x00")) >= 0:
            raise AgptError(f"{path}: NUL byte at offset {offset + i}: this looks like a binary "
                            "file, not text; remove it from the inputs or use --tokenizer byte")
        yield raw, _decode(dec, raw, False, path, offset)
        offset += len(raw)
    tail = _decode(dec, b"", True, path, offset)
    if tail:  # cannot happen with strict UTF-8, kept for safety
        yield b"", tail


def _decode(dec: codecs.IncrementalDecoder, raw: bytes, final: bool, path: Path, offset: int) -> str:
    pending = len(dec.getstate()[0])
    try:
        return dec.decode(raw, final)
    except UnicodeDecodeError as e:
        at = offset - pending + e.start
        raise AgptError(f"{path}: bytes at offset {at} are not valid UTF-8 ({e.reason}); "
                        "convert the file to UTF-8 or use --tokenizer byte") from None


# -- output -------------------------------------------------------------------------------------

def _check_output(out: str, force: bool) -> None:
    """Refuse to overwrite anything unless it is an unfinished corpus or `force` is given.

    Even with `force`, a path holding something that is not an AGPT store is never replaced:
    Zarr's overwrite deletes the whole directory.
    """
    local = _local_path(out)
    if local is not None:
        if not local.exists() or (local.is_dir() and not any(local.iterdir())):
            return
        if not (local / "zarr.json").is_file():
            raise AgptError(f"{out} exists and is not an AGPT store: refusing to overwrite it; "
                            "choose another --out")
    try:
        group = open_root(out, "r")
    except StoreFormatError as e:
        if isinstance(e.__cause__, FileNotFoundError):
            return  # nothing there yet
        raise
    meta = group.attrs.get("agpt")
    if not isinstance(meta, dict) or meta.get("format") not in (CORPUS_KIND, TRIE_KIND):
        raise AgptError(f"{out} is a Zarr store but not an AGPT store: refusing to overwrite it; "
                        "choose another --out")
    if meta.get("format") == CORPUS_KIND and meta.get("status") != STATUS_COMPLETE:
        return  # an interrupted ingest: redo it
    if not force:
        raise AgptError(f"{out} already exists (an {meta.get('format')} store): pass --force to "
                        "replace it, or choose another --out")


# -- the two passes -----------------------------------------------------------------------------

@dataclass
class _Scan:
    """What pass 1 learns about the inputs."""

    n_tokens: int = 0
    n_bytes: int = 0
    sha256: str = ""
    vocab: np.ndarray = field(default_factory=lambda: np.arange(256))
    file_bytes: list[int] = field(default_factory=list)
    file_tokens: list[int] = field(default_factory=list)


def _scan_char(files: list[Path], chunk_bytes: int) -> _Scan:
    """Pass 1 for `char`: distinct code points, character counts, sha256; all input errors."""
    seen = np.zeros(N_CODE_POINTS, dtype=bool)
    sha = hashlib.sha256()
    scan = _Scan()
    for path in files:
        nb = nt = 0
        for raw, text in _decode_chunks(path, chunk_bytes, check_nul=True):
            sha.update(raw)
            nb += len(raw)
            nt += len(text)
            distinct_code_points(text, seen)
        scan.file_bytes.append(nb)
        scan.file_tokens.append(nt)
    scan.vocab = np.flatnonzero(seen)
    scan.n_tokens, scan.n_bytes = sum(scan.file_tokens), sum(scan.file_bytes)
    scan.sha256 = sha.hexdigest()
    return scan


def _scan_byte(files: list[Path]) -> _Scan:
    """Pass 1 for `byte` needs no reading: one token per byte (the hash comes in pass 2)."""
    sizes = [p.stat().st_size for p in files]
    return _Scan(n_tokens=sum(sizes), n_bytes=sum(sizes), file_bytes=sizes, file_tokens=sizes)


def _encode_chunks(files: list[Path], tok: Tokenizer, chunk_bytes: int
                   ) -> Iterator[tuple[bytes, np.ndarray]]:
    """Pass 2: (raw bytes, ids) per chunk, in input order."""
    for path in files:
        if tok.name == "byte":
            for raw in _read_chunks(path, chunk_bytes):
                yield raw, np.frombuffer(raw, dtype=np.uint8)
        else:
            for raw, text in _decode_chunks(path, chunk_bytes, check_nul=False):
                yield raw, tok.encode(text)


def _changed() -> AgptError:
    return AgptError("the input files changed while they were being ingested: rerun the ingest "
                     "when nothing is writing to them")


def ingest(inputs: Sequence[str | os.PathLike], out: str, tokenizer: str = "char",
           holdout: float = 0.1, documents: bool = False,
           chunk_bytes: int = DEFAULT_CHUNK_BYTES, force: bool = False) -> CorpusStore:
    """Tokenize `inputs` into a new corpus store at `out` and return it opened.

    The last floor(n * holdout) tokens are held out (never enter the trie; `perplexity` scores
    them). With `documents`, each input file is its own document: no context crosses files.
    Every input problem is found before the output is touched; an existing store is replaced
    only with `force` (an unfinished ingest is always redone).
    """
    out = os.fspath(out)
    if tokenizer not in TOKENIZERS:
        raise AgptError(f"unknown tokenizer {tokenizer!r}: use one of {', '.join(TOKENIZERS)}")
    if not (isinstance(holdout, int | float) and math.isfinite(holdout) and 0 <= holdout < 1):
        raise AgptError(f"--holdout must be a fraction in [0, 1), got {holdout}: it is the share "
                        "of the token stream held out for perplexity (0 = none)")
    chunk_bytes = int(chunk_bytes)
    if chunk_bytes < 1:
        raise AgptError(f"the read chunk must be at least 1 byte, got {chunk_bytes}")
    files = resolve_inputs(inputs, exclude=_local_path(out))
    _check_output(out, force)

    scan = _scan_char(files, chunk_bytes) if tokenizer == "char" else _scan_byte(files)
    n = scan.n_tokens
    if n == 0:
        raise AgptError(f"the corpus is empty ({len(files)} input file(s), 0 bytes): give "
                        "at least one non-empty text file")
    held = math.floor(n * holdout)
    train_end = n - held
    if train_end < 2:
        raise AgptError(f"only {train_end} training token(s) ({n} in all, {held} held out): a "
                        "trie needs at least 2; use a larger corpus or a smaller --holdout")
    tok = Tokenizer(tokenizer, scan.vocab)  # a vocabulary beyond uint32 fails here

    counts = np.asarray(scan.file_tokens, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    doc_starts = offsets[counts > 0] if documents else np.zeros(1, dtype=np.int64)
    sources = [{"path": str(p), "bytes": b, "tokens": t} for p, b, t in
               zip(files, scan.file_bytes, scan.file_tokens, strict=True)][:MAX_SOURCES]
    meta = header(CORPUS_KIND, **tok.to_meta(), n_tokens=n, train_end=train_end,
                  holdout_fraction=float(holdout), documents=bool(documents),
                  n_documents=int(doc_starts.size), corpus_sha256=scan.sha256,
                  n_bytes=scan.n_bytes, sources=sources, n_sources=len(files))

    group = open_root(out, "w")  # replaces an unfinished (or, with force, an old) store
    sha = hashlib.sha256()
    try:
        with create_corpus_group(group, meta, doc_starts) as writer:
            for raw, ids in _encode_chunks(files, tok, chunk_bytes):
                sha.update(raw)
                writer.write(ids)
    except OverflowError:
        raise _changed() from None
    if scan.sha256 and sha.hexdigest() != scan.sha256:
        raise _changed()
    mark_complete(group, corpus_sha256=sha.hexdigest())
    return CorpusStore.from_group(group, out)
