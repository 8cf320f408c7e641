"""Order-k character Markov chain: make a large corpus with realistic statistics, offline.

Build benchmarks need corpora of 100 MB and more, far beyond tinyshakespeare, and a random
string would have the wrong trie shape (no shared prefixes). An order-k chain fitted to real
text reproduces its (k+1)-gram statistics, so its trie looks like a real corpus's trie.

How it is fast: every occurrence of a context in the training text is one slot of a table sorted
by context, so a context owns a contiguous run ``[base, base + count)`` of slots. Sampling the
next character is then "pick a uniform slot of the run": the slot gives the next character and
the (base, count) of the next context directly, with no search. Many independent chains (one
per output segment) are advanced in lockstep with NumPy, which amortises the Python overhead of
a step over thousands of characters. Each chain writes its own contiguous segment of the output
and starts with the k characters of a training context, so within a segment every (k+1)-gram
was seen in training; the only other seams are back-offs from a context that never has a
successor (the training text's last k-gram, when it occurs nowhere else).

CLI::

    python bench/markov.py --train FILE --order 6 --size-mb 100 --seed 0 -o OUT.txt

``--size-mb`` counts characters in units of 10^6; the UTF-8 output is at least that many bytes.
"""

import argparse
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_STREAMS = 4096
MIN_SEGMENT = 16_384  # fewer, longer chains for small outputs: fewer seams
_BLOCK_CELLS = 1 << 22  # characters per block handed to a sink (bounds memory)


@dataclass(frozen=True)
class MarkovModel:
    """The fitted chain; see the module docstring for the slot layout."""

    order: int
    alphabet: np.ndarray  # uint32 code points, sorted; token id = rank
    # Per slot, packed in one int64 so that a step costs one random memory access:
    # next char id | first slot of the next context's run << char_bits
    # | that run's length << (char_bits + base_bits)   (length 0 = dead end)
    step: np.ndarray
    char_bits: int
    base_bits: int
    slot_pos: np.ndarray  # per slot: position in the training text of this occurrence
    run_base: np.ndarray  # per distinct context (in slot order): first slot of its run
    run_count: np.ndarray  # per distinct context: run length = its training count
    train_ids: np.ndarray  # the training text as ids (start contexts are read from it)

    @property
    def n_slots(self) -> int:
        return int(self.step.shape[0])

    @property
    def char_dtype(self) -> np.dtype:
        return self.train_ids.dtype


def _text_to_ids(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (alphabet code points, ids) with id = rank of the code point (SPEC §3 char ids)."""
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    present = np.zeros(int(cps.max(initial=0)) + 1, dtype=bool)  # a table: O(n), no sort
    present[cps] = True
    alphabet = np.flatnonzero(present).astype(np.uint32)
    ids = (np.cumsum(present) - 1)[cps]
    dtype = np.uint8 if len(alphabet) <= 256 else np.uint16 if len(alphabet) <= 65536 else np.uint32
    return alphabet, ids.astype(dtype)


def _gram_codes(ids: np.ndarray, k: int, vocab: int) -> np.ndarray:
    """Integer code of the k-gram at every position (equal codes iff equal k-grams).

    Rolling base-V codes when V^k fits in int64; otherwise renumber densely after every
    character so codes stay below n * V.
    """
    n = len(ids) - k + 1
    code = np.zeros(n, dtype=np.int64)
    exact = vocab**k < 2**62
    for j in range(k):
        code = code * vocab + ids[j : j + n]
        if not exact:
            code = np.unique(code, return_inverse=True)[1].astype(np.int64)
    return code


def fit(train_text: str, order: int) -> MarkovModel:
    """Fit an order-k chain; memory is roughly 50 bytes per training character."""
    if order < 0:
        raise ValueError(f"order must be >= 0, got {order}")
    alphabet, ids = _text_to_ids(train_text)
    n = len(ids)
    if n <= order:
        raise ValueError(f"training text has {n} characters; order {order} needs more than {order}")
    m = n - order  # occurrences with a successor: contexts at positions 0..m-1
    ctx = _gram_codes(ids, order, len(alphabet))  # length m + 1
    slot_pos = np.argsort(ctx[:m], kind="stable")
    sorted_ctx = ctx[:m][slot_pos]
    states, base, count = np.unique(sorted_ctx, return_index=True, return_counts=True)
    # The context after an occurrence at position p is the one at p + 1 (possibly the final,
    # successor-less k-gram at position m: then it is not a state and the slot is a dead end).
    following = ctx[slot_pos + 1]
    del ctx
    state = np.minimum(np.searchsorted(states, following), len(states) - 1)
    found = states[state] == following
    del following
    char_bits = max(1, (len(alphabet) - 1).bit_length())
    base_bits = max(1, m.bit_length())
    count_bits = int(count.max()).bit_length()
    if char_bits + base_bits + count_bits > 63:
        raise ValueError(
            f"training text too large to pack ({n:,} characters, {len(alphabet)} symbols); "
            "use a shorter training text"
        )
    step = ids[slot_pos + order].astype(np.int64)
    step |= np.where(found, base[state], 0).astype(np.int64) << char_bits
    step |= np.where(found, count[state], 0).astype(np.int64) << (char_bits + base_bits)
    idx_t = np.int32 if m < 2**31 else np.int64
    return MarkovModel(
        order=order,
        alphabet=alphabet,
        step=step,
        char_bits=char_bits,
        base_bits=base_bits,
        slot_pos=slot_pos.astype(idx_t),
        run_base=base.astype(idx_t),
        run_count=count.astype(idx_t),
        train_ids=ids,
    )


def _n_streams(n_chars: int, streams: int | None) -> int:
    """Chains to run: many for speed, but segments of at least MIN_SEGMENT (fewer seams)."""
    if streams is None:
        streams = min(DEFAULT_STREAMS, max(1, n_chars // MIN_SEGMENT))
    return max(1, min(int(streams), n_chars))


def _random_runs(
    model: MarkovModel, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random contexts, drawn by training frequency: (slot, run base, run count)."""
    slot = rng.integers(0, model.n_slots, size=size)
    i = np.searchsorted(model.run_base, slot, side="right") - 1
    return slot, model.run_base[i].astype(np.int64), model.run_count[i].astype(np.int64)


def _run_chains(
    model: MarkovModel, n_chars: int, seed: int, streams: int | None
) -> Iterator[tuple[int, np.ndarray, int]]:
    """Yield (t0, block, seg_len): block[b] holds characters t0.. of segment b.

    Segment b covers output positions [b * seg_len, (b + 1) * seg_len), the last one cut at
    n_chars by the consumer. Deterministic for (model, n_chars, seed, streams).
    """
    n_streams = _n_streams(n_chars, streams)
    seg_len = -(-n_chars // n_streams)
    n_streams = -(-n_chars // seg_len)
    rng = np.random.default_rng(seed)
    # Each segment opens with the k characters of a random training context, its first state.
    slot, base, count = _random_runs(model, rng, n_streams)
    head = min(model.order, seg_len)
    if head:
        pos = model.slot_pos[slot].astype(np.int64)
        yield 0, model.train_ids[pos[:, None] + np.arange(head)], seg_len
    step = model.step
    cb, bb = model.char_bits, model.base_bits
    cmask, bmask = (1 << cb) - 1, (1 << bb) - 1
    block_steps = max(1, _BLOCK_CELLS // n_streams)
    t = head
    while t < seg_len:
        steps = min(block_steps, seg_len - t)
        out = np.empty((steps, n_streams), dtype=model.char_dtype)
        rbits = rng.integers(0, 1 << 32, size=(steps, n_streams), dtype=np.int64)
        for i in range(steps):
            # Lemire's multiply-shift: a uniform slot of [base, base + count), never past it.
            w = step[base + ((rbits[i] * count) >> 32)]
            out[i] = w & cmask
            base = (w >> cb) & bmask
            count = w >> (cb + bb)
            if not count.all():  # dead end: back off to a random training context
                dead = np.flatnonzero(count == 0)
                _, base[dead], count[dead] = _random_runs(model, rng, len(dead))
        yield t, out.T, seg_len
        t += steps


def _encoder(alphabet: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes of each alphabet symbol as a [V, 4] table plus lengths (vectorised encode)."""
    table = np.zeros((len(alphabet), 4), dtype=np.uint8)
    lens = np.zeros(len(alphabet), dtype=np.int64)
    for i, cp in enumerate(alphabet.tolist()):
        b = chr(cp).encode("utf-8")
        table[i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
        lens[i] = len(b)
    return table, lens


def _encode(ids: np.ndarray, table: np.ndarray, lens: np.ndarray) -> bytes:
    if int(lens.max()) == 1:
        return table[ids, 0].tobytes()
    rows = table[ids]
    return rows[np.arange(4) < lens[ids][:, None]].tobytes()


def generate(
    train_text: str, order: int, n_chars: int, seed: int, streams: int | None = None
) -> str:
    """Generate n_chars characters in memory (small uses and tests)."""
    model = fit(train_text, order)
    ids = _generate_ids(model, n_chars, seed, streams)
    table, lens = _encoder(model.alphabet)
    return _encode(ids, table, lens).decode("utf-8")


def _generate_ids(model: MarkovModel, n_chars: int, seed: int, streams: int | None) -> np.ndarray:
    n_streams = _n_streams(max(n_chars, 1), streams)
    seg_len = -(-n_chars // n_streams) if n_chars else 0
    out = np.empty((-(-n_chars // seg_len) if seg_len else 0, seg_len), dtype=model.char_dtype)
    if n_chars:
        for t0, block, _ in _run_chains(model, n_chars, seed, streams):
            out[:, t0 : t0 + block.shape[1]] = block
    return out.reshape(-1)[:n_chars]


def generate_file(
    model: MarkovModel,
    n_chars: int,
    seed: int,
    out_path: str | os.PathLike[str],
    streams: int | None = None,
) -> int:
    """Write n_chars characters to out_path with bounded memory; return the bytes written.

    Single-byte alphabets (ASCII) are written straight into place; otherwise ids go to a
    scratch file first, since a segment's byte offset is unknown until the earlier ones exist.
    The file appears atomically (written under a temporary name, then renamed).
    """
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".part")
    table, lens = _encoder(model.alphabet)
    direct = int(lens.max()) == 1
    item = 1 if direct else model.char_dtype.itemsize
    scratch = tmp if direct else out_path.with_name(out_path.name + ".ids")
    fd = os.open(scratch, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for t0, block, seg_len in _run_chains(model, n_chars, seed, streams):
            width = block.shape[1]
            data = table[block, 0] if direct else block
            for b in range(block.shape[0]):
                start = b * seg_len + t0
                if start >= n_chars:
                    break
                row = data[b, : min(width, n_chars - start)]
                os.pwrite(fd, np.ascontiguousarray(row).tobytes(), start * item)
        if direct:
            written = n_chars
        else:
            written = 0
            with open(tmp, "wb") as f:
                step = _BLOCK_CELLS
                for lo in range(0, n_chars, step):
                    chunk = os.pread(fd, (min(step, n_chars - lo)) * item, lo * item)
                    ids = np.frombuffer(chunk, dtype=model.char_dtype)
                    data = _encode(ids, table, lens)
                    f.write(data)
                    written += len(data)
    finally:
        os.close(fd)
        if not direct:
            scratch.unlink(missing_ok=True)
    os.replace(tmp, out_path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", required=True, type=Path, help="UTF-8 training text")
    ap.add_argument("--order", type=int, default=6, help="context length k (default 6)")
    size = ap.add_mutually_exclusive_group(required=True)
    size.add_argument("--size-mb", type=float, help="output size in 10^6 characters")
    size.add_argument("--chars", type=int, help="output size in characters")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--streams",
        type=int,
        default=None,
        help=f"parallel chains = output segments (default up to {DEFAULT_STREAMS})",
    )
    ap.add_argument("-o", "--output", required=True, type=Path)
    args = ap.parse_args(argv)
    n_chars = args.chars if args.chars is not None else int(round(args.size_mb * 1e6))
    if n_chars <= 0:
        ap.error("output size must be positive")
    t0 = time.perf_counter()
    try:
        with open(args.train, encoding="utf-8", newline="") as f:  # keep \r\n as it is
            text = f.read()
        model = fit(text, args.order)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        print(f"markov: {e}", file=sys.stderr)
        return 2
    del text
    t1 = time.perf_counter()
    nbytes = generate_file(model, n_chars, args.seed, args.output, args.streams)
    t2 = time.perf_counter()
    print(
        f"markov: order {args.order}, {len(model.alphabet)} symbols, {model.n_slots:,} training "
        f"contexts; fit {t1 - t0:.2f} s; generated {n_chars:,} chars ({nbytes / 1e6:.1f} MB) "
        f"in {t2 - t1:.2f} s ({nbytes / 1e6 / max(t2 - t1, 1e-9):.1f} MB/s) -> {args.output}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
