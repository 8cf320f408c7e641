"""Tokenizers: map text to integer ids and back (SPEC §3).

`char`: the vocabulary is the sorted list of distinct Unicode code points of the corpus and a
symbol's id is its rank, the seed's convention, so ids match the seed's for the same text.
`byte`: the vocabulary is the 256 byte values and a byte's id is its value; it accepts any input.

Ids are NumPy arrays of `token_dtype(vocab_size)` (uint8/uint16/uint32): nothing here assumes an
id fits in a byte, so subword vocabularies can plug into the same interface later.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from agpt.errors import AgptError
from agpt.store.format import token_dtype

TOKENIZERS = ("char", "byte")

#: one past the largest Unicode code point.
N_CODE_POINTS = 0x110000


def code_points(text: str) -> np.ndarray:
    """The code points of `text` without a Python-level loop: uint8 for ASCII, else uint32.

    ASCII text (the common case) skips the 4x wider UTF-32 copy, which dominates ingest time.
    """
    if text.isascii():
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    try:
        return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    except UnicodeEncodeError as e:  # a lone surrogate: only from str built by hand
        raise AgptError(f"text contains a lone surrogate at position {e.start}: it is not valid "
                        "Unicode; fix the text") from e


def distinct_code_points(text: str, seen: np.ndarray) -> None:
    """Mark the code points of `text` in the boolean table `seen` (N_CODE_POINTS entries).

    For ASCII, bytes.translate first deletes the symbols already seen (one fast C pass), so
    only chunks that bring new symbols pay for a histogram.
    """
    if text.isascii():
        old = np.flatnonzero(seen[:128]).astype(np.uint8).tobytes()
        new = text.encode("ascii").translate(None, old)
        if new:
            seen[:128] |= np.bincount(np.frombuffer(new, np.uint8), minlength=128).astype(bool)
    else:
        seen[code_points(text)] = True


class Tokenizer:
    """A vocabulary plus vectorised encode/decode.

    `vocab[i]` is what id i stands for: a code point for `char`, a byte value for `byte`.
    Build one with `Tokenizer.char(vocab)`, `Tokenizer.from_text(text)`, `Tokenizer.byte()`
    or `Tokenizer.from_meta(store_attrs)`.
    """

    def __init__(self, name: str, vocab: Sequence[int] | np.ndarray) -> None:
        if name not in TOKENIZERS:
            raise AgptError(f"unknown tokenizer {name!r}: use one of {', '.join(TOKENIZERS)}")
        table = np.asarray(vocab, dtype=np.int64).reshape(-1)
        if name == "byte" and not np.array_equal(table, np.arange(256)):
            raise AgptError("the byte tokenizer's vocabulary must be the 256 byte values in order")
        if table.size and (table[0] < 0 or table[-1] >= N_CODE_POINTS or np.any(np.diff(table) <= 0)):
            raise AgptError("a char vocabulary must be strictly increasing Unicode code points")
        self.name = name
        self.vocab_size = int(table.size)
        self.dtype = token_dtype(self.vocab_size)
        self._table = table.astype(np.uint32)
        self._lut: np.ndarray | None = None
        self._ascii: tuple[bytes, bytes] | None = None

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def char(cls, vocab: Sequence[int] | np.ndarray) -> Tokenizer:
        """A char tokenizer over the given (sorted, distinct) code points."""
        return cls("char", vocab)

    @classmethod
    def from_text(cls, text: str) -> Tokenizer:
        """The char tokenizer of `text`: its distinct code points, sorted."""
        return cls("char", np.unique(code_points(text)))

    @classmethod
    def byte(cls) -> Tokenizer:
        """The byte tokenizer: id = byte value, for any input including non-UTF-8."""
        return cls("byte", np.arange(256))

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Rebuild from a store's `agpt` attribute (keys `tokenizer`, `vocab`)."""
        return cls(str(meta["tokenizer"]), list(meta["vocab"]))

    def to_meta(self) -> dict[str, Any]:
        """The attributes a store records so that readers rebuild the same tokenizer."""
        return {"tokenizer": self.name, "vocab": self.vocab, "vocab_size": self.vocab_size,
                "token_dtype": self.dtype.name}

    # -- properties -----------------------------------------------------------------------------

    @property
    def vocab(self) -> list[int]:
        """What each id stands for: code points (`char`) or byte values (`byte`)."""
        return self._table.tolist()

    def symbol(self, i: int) -> str:
        """A printable form of id `i` (for reports and samplers)."""
        if not 0 <= i < self.vocab_size:
            raise AgptError(f"token id {i} is outside the vocabulary of {self.vocab_size} ids")
        v = int(self._table[i])
        return chr(v) if self.name == "char" else f"\\x{v:02x}" if v >= 0x80 else chr(v)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Tokenizer) and self.name == other.name
                and np.array_equal(self._table, other._table))

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"

    # -- encode / decode ------------------------------------------------------------------------

    def encode(self, data: str | bytes) -> np.ndarray:
        """Ids of `data` as a 1-D array of `self.dtype`; an unknown symbol is an AgptError."""
        if self.name == "byte":
            raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
            return np.frombuffer(raw, dtype=np.uint8).copy()
        if not isinstance(data, str):
            try:
                data = bytes(data).decode("utf-8")
            except UnicodeDecodeError as e:
                raise AgptError(f"bytes at offset {e.start} are not valid UTF-8: decode the text "
                                "first or use the byte tokenizer") from e
        if data.isascii():
            return self._encode_ascii(data.encode("ascii"))
        cps = code_points(data)
        lut = self._lookup()
        if int(cps.max()) >= lut.size:
            self._unknown(cps[cps >= lut.size])
        ids = np.take(lut, cps)
        if int(ids.min()) < 0:
            self._unknown(cps[ids < 0])
        return ids.astype(self.dtype, copy=False)

    def _encode_ascii(self, raw: bytes) -> np.ndarray:
        """ASCII fast path: ids by bytes.translate (ASCII ranks are < 128, so they fit a byte)."""
        if self._ascii is None:
            known = self._table[self._table < 128]
            table = np.zeros(256, dtype=np.uint8)
            table[known] = np.arange(known.size)
            self._ascii = (table.tobytes(), known.astype(np.uint8).tobytes())
        table, known = self._ascii
        if unknown := raw.translate(None, known):
            self._unknown(np.frombuffer(unknown[:1], np.uint8))
        return np.frombuffer(raw.translate(table), np.uint8).astype(self.dtype)

    def _unknown(self, cps: np.ndarray) -> None:
        cp = int(cps[0])
        raise AgptError(f"symbol {chr(cp)!r} (U+{cp:04X}) is not in this {self.vocab_size}-symbol "
                        "char vocabulary: re-ingest a corpus that contains it")

    def decode_bytes(self, ids: np.ndarray | Sequence[int]) -> bytes:
        """The UTF-8 bytes that `ids` stand for (exact for the byte tokenizer)."""
        vals = self._values(ids)
        if self.name == "byte":
            return vals.astype(np.uint8).tobytes()
        return self.decode(ids).encode("utf-8")

    def decode(self, ids: np.ndarray | Sequence[int], errors: str = "replace") -> str:
        """The text of `ids`. Byte ids that cut a UTF-8 sequence decode per `errors`."""
        vals = self._values(ids)
        if self.name == "byte":
            return vals.astype(np.uint8).tobytes().decode("utf-8", errors=errors)
        return vals.astype("<u4").tobytes().decode("utf-32-le")

    def _values(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        a = np.asarray(ids).reshape(-1)
        if not a.size:
            return a.astype(np.uint32)
        if a.dtype.kind not in "ui" or int(a.min()) < 0 or int(a.max()) >= self.vocab_size:
            raise AgptError(f"token ids must be integers in [0, {self.vocab_size}): these ids do "
                            "not belong to this vocabulary")
        return self._table[a]

    def _lookup(self) -> np.ndarray:
        """Code point -> id table (-1 = not in vocabulary); at most 4.4 MB, built once."""
        if self._lut is None:
            size = int(self._table[-1]) + 1 if self.vocab_size else 1
            wide = np.int16 if self.vocab_size <= 1 << 15 else np.int32  # narrow = less traffic
            lut = np.full(size, -1, dtype=wide)
            lut[self._table] = np.arange(self.vocab_size, dtype=wide)
            self._lut = lut
        return self._lut


def get_tokenizer(name: str, vocab: Sequence[int] | None = None) -> Tokenizer:
    """A tokenizer by name; `char` needs its vocabulary."""
    if name == "byte":
        return Tokenizer.byte()
    if name == "char":
        if vocab is None:
            raise AgptError("the char tokenizer needs a vocabulary (ingest the corpus first)")
        return Tokenizer.char(vocab)
    raise AgptError(f"unknown tokenizer {name!r}: use one of {', '.join(TOKENIZERS)}")
