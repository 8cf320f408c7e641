"""Ingest, tokenizers, the corpus store and the demo corpus (SPEC §3, §5, §10)."""

from __future__ import annotations

import hashlib
import math
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agpt.store.corpus as corpus_mod
from agpt.demo import markdown_to_text, play_files, write_demo_corpus
from agpt.errors import AgptError, StoreFormatError
from agpt.ingest import ingest
from agpt.store.corpus import BlockWriter, CorpusStore, copy_corpus, open_corpus
from agpt.store.format import open_root, token_dtype
from agpt.tokenize import Tokenizer

TS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
#: 1-4 byte UTF-8 characters, combining marks, emoji with modifiers and ZWJ sequences.
UNICODE_TEXT = "aé€𝄞 中文 😀👍🏽 👩‍👩‍👧 e\u0301 Ωmega ﬁ\n" * 3


@pytest.fixture
def small_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny chunks and shards so that small corpora span many shards."""
    monkeypatch.setattr(corpus_mod, "TOKEN_CHUNK", 4)
    monkeypatch.setattr(corpus_mod, "TOKEN_SHARD", 16)


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_bytes(data.encode("utf-8"))
    else:
        path.write_bytes(data)
    return path


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes: to prove a store was left untouched."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def ranks(text: str) -> np.ndarray:
    """The seed's char ids: rank of each code point among the sorted distinct ones."""
    cps = np.array([ord(c) for c in text], dtype=np.int64)
    return np.searchsorted(np.unique(cps), cps)


# -- tokenizers ---------------------------------------------------------------------------------

def test_char_ids_are_ranks_of_sorted_code_points() -> None:
    text = "hello, world! ¡hola! 😀"
    tok = Tokenizer.from_text(text)
    assert tok.vocab == sorted({ord(c) for c in text})
    ids = tok.encode(text)
    assert ids.dtype == np.uint8
    assert ids.tolist() == ranks(text).tolist()
    assert tok.decode(ids) == text
    assert tok.encode(text.encode("utf-8")).tolist() == ids.tolist()
    assert Tokenizer.from_meta(tok.to_meta()) == tok


def test_char_unknown_symbol_and_bad_ids() -> None:
    tok = Tokenizer.from_text("abc")
    with pytest.raises(AgptError, match=r"'z' \(U\+007A\)"):
        tok.encode("abz")
    with pytest.raises(AgptError, match="U\\+1F600"):
        tok.encode("a😀")
    with pytest.raises(AgptError, match=r"\[0, 3\)"):
        tok.decode([0, 3])


def test_byte_tokenizer() -> None:
    tok = Tokenizer.byte()
    assert tok.vocab == list(range(256)) and tok.dtype == np.uint8
    assert tok.encode("é").tolist() == [0xC3, 0xA9]
    assert tok.decode_bytes(tok.encode(b"\xff\x00a")) == b"\xff\x00a"
    assert tok.decode(tok.encode(UNICODE_TEXT)) == UNICODE_TEXT


def test_token_dtype_grows_with_vocabulary() -> None:
    assert Tokenizer.char(range(300)).dtype == np.uint16
    big = Tokenizer.char(np.arange(70_000))
    assert big.dtype == np.uint32
    text = "".join(chr(c) for c in (0, 65_536, 69_999))
    assert big.encode(text).tolist() == [0, 65_536, 69_999]
    assert big.decode(big.encode(text)) == text
    with pytest.raises(StoreFormatError, match="does not fit uint32"):
        token_dtype((1 << 32) + 1)


# -- ingest round trips -------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 6, 7, 1 << 20])
def test_multibyte_utf8_split_by_chunk_boundaries(tmp_path: Path, chunk: int, small_shards: None
                                                   ) -> None:
    src = write(tmp_path / "u.txt", UNICODE_TEXT)
    store = ingest([str(src)], str(tmp_path / "c.zarr"), chunk_bytes=chunk, holdout=0)
    assert store.tokenizer.decode(store.tokens()) == UNICODE_TEXT
    assert store.tokens().tolist() == ranks(UNICODE_TEXT).tolist()
    assert store.meta["corpus_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()


texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                max_size=60)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(texts, min_size=1, max_size=3), chunk=st.integers(1, 7),
       documents=st.booleans(), holdout=st.sampled_from([0.0, 0.1, 0.5]))
def test_char_round_trip_random_text(small_shards: None, parts: list[str], chunk: int,
                                     documents: bool, holdout: float) -> None:
    text = "".join(parts)
    n = len(text)
    with tempfile.TemporaryDirectory() as d:
        files = [str(write(Path(d) / f"{i}.txt", p)) for i, p in enumerate(parts)]
        if n - math.floor(n * holdout) < 2:
            with pytest.raises(AgptError):
                ingest(files, f"{d}/c.zarr", holdout=holdout, chunk_bytes=chunk)
            return
        store = ingest(files, f"{d}/c.zarr", holdout=holdout, documents=documents,
                       chunk_bytes=chunk)
        store = open_corpus(f"{d}/c.zarr")
        toks = store.tokens()
        assert toks.dtype == store.dtype
        assert store.tokenizer.decode(toks) == text
        assert toks.tolist() == ranks(text).tolist()
        assert store.train_end == n - math.floor(n * holdout)
        sizes = np.array([len(p) for p in parts])
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        expect = offsets[sizes > 0].tolist() if documents else [0]
        assert store.doc_starts.tolist() == expect
        assert store.meta["corpus_sha256"] == hashlib.sha256(text.encode()).hexdigest()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=2, max_size=200), chunk=st.integers(1, 7))
def test_byte_round_trip_random_bytes(small_shards: None, data: bytes, chunk: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        src = write(Path(d) / "b.bin", data)
        store = ingest([str(src)], f"{d}/b.zarr", tokenizer="byte", holdout=0, chunk_bytes=chunk)
        assert store.tokens().tobytes() == data
        assert store.tokenizer.decode_bytes(store.tokens()) == data
        assert store.meta["corpus_sha256"] == hashlib.sha256(data).hexdigest()


def test_tiny_shakespeare(tmp_path: Path, tiny_shakespeare: Path) -> None:
    raw = tiny_shakespeare.read_bytes()
    store = ingest([str(tiny_shakespeare)], str(tmp_path / "ts.zarr"))
    assert store.n_tokens == 1_115_394
    assert store.vocab_size == 65 and store.dtype == np.uint8
    assert store.meta["corpus_sha256"] == TS_SHA256 == hashlib.sha256(raw).hexdigest()
    assert store.train_end == 1_115_394 - 111_539
    text = raw.decode("utf-8")
    assert store.vocab == sorted({ord(c) for c in text})
    cps = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    assert np.array_equal(store.tokens(), np.searchsorted(store.vocab, cps))
    assert store.tokenizer.decode(store.tokens(0, 14)) == "First Citizen:"
    assert store.train_documents().tolist() == [[0, 1_003_855]]


# -- inputs and documents -----------------------------------------------------------------------

def test_files_as_documents(tmp_path: Path, small_shards: None) -> None:
    files = [write(tmp_path / "a.txt", "abc"), write(tmp_path / "b.txt", ""),
             write(tmp_path / "c.txt", "defg"), write(tmp_path / "d.txt", "hij")]
    store = ingest([str(f) for f in files], str(tmp_path / "c.zarr"), documents=True, holdout=0.3)
    assert store.n_tokens == 10 and store.train_end == 7
    assert store.doc_starts.tolist() == [0, 3, 7]
    assert store.meta["n_documents"] == 3 and store.meta["documents"] is True
    assert store.train_documents().tolist() == [[0, 3], [3, 7]]  # d.txt is all held out
    assert [s["tokens"] for s in store.meta["sources"]] == [3, 0, 4, 3]
    one = ingest([str(f) for f in files], str(tmp_path / "s.zarr"), holdout=0.3)
    assert one.doc_starts.tolist() == [0] and one.train_documents().tolist() == [[0, 7]]


def test_directory_and_glob_inputs(tmp_path: Path) -> None:
    write(tmp_path / "in" / "b.txt", "B")
    write(tmp_path / "in" / "a.txt", "A")
    write(tmp_path / "in" / "sub" / "c.txt", "C")
    write(tmp_path / "in" / ".hidden", "\x00")
    write(tmp_path / "x1.md", "X")
    write(tmp_path / "x2.md", "Y")
    store = ingest([str(tmp_path / "x*.md"), str(tmp_path / "in")], str(tmp_path / "o.zarr"),
                   holdout=0)
    assert store.tokenizer.decode(store.tokens()) == "XYABC"
    assert [Path(s["path"]).name for s in store.meta["sources"]] == \
        ["x1.md", "x2.md", "a.txt", "b.txt", "c.txt"]
    assert store.meta["n_sources"] == 5
    # a store written inside an input folder is never read back as input
    for force in (False, True):
        inside = ingest([str(tmp_path / "in")], str(tmp_path / "in" / "o.zarr"), holdout=0,
                        force=force)
        assert inside.tokenizer.decode(inside.tokens()) == "ABC"


@pytest.mark.parametrize(("n", "holdout"), [(10, 0.0), (10, 0.1), (101, 0.15), (7, 0.5),
                                            (1_000, 0.99), (12_345, 0.333)])
def test_holdout_arithmetic(tmp_path: Path, n: int, holdout: float) -> None:
    src = write(tmp_path / "t.txt", "ab" * (n // 2) + "a" * (n % 2))
    store = ingest([str(src)], str(tmp_path / "c.zarr"), holdout=holdout)
    held = math.floor(n * holdout)
    assert (store.n_tokens, store.train_end) == (n, n - held)
    assert store.train_documents().tolist() == [[0, n - held]]
    assert len(store.train_tokens()) + len(store.heldout_tokens()) == n


@pytest.mark.parametrize("inflight", [0, 2])
def test_block_writer_writes_each_shard_once(inflight: int) -> None:
    class FakeArray:
        shape, dtype, shards, chunks = (50,), np.dtype(np.uint16), (16,), (4,)

        def __init__(self) -> None:
            self.data = np.zeros(50, np.uint16)
            self.writes: list[tuple[int, int]] = []

        def __setitem__(self, sl: slice, v: np.ndarray) -> None:
            self.writes.append((sl.start, sl.stop))
            self.data[sl] = v

    arr = FakeArray()
    with BlockWriter(arr, inflight=inflight) as w:  # type: ignore[arg-type]
        for piece in np.array_split(np.arange(50, dtype=np.uint16), [3, 4, 30, 31, 49]):
            w.write(piece)
    assert sorted(arr.writes) == [(0, 16), (16, 32), (32, 48), (48, 50)]  # written in parallel
    assert np.array_equal(arr.data, np.arange(50))


# -- the store ----------------------------------------------------------------------------------

def test_copy_corpus_round_trip(tmp_path: Path, small_shards: None) -> None:
    src = write(tmp_path / "a.txt", UNICODE_TEXT)
    write(tmp_path / "b.txt", "second document")
    orig = ingest([str(src), str(tmp_path / "b.txt")], str(tmp_path / "c.zarr"), documents=True)
    root = open_root(str(tmp_path / "trie.zarr"), "w")
    copy = copy_corpus(orig, root)
    again = CorpusStore.from_group(zarr.open_group(str(tmp_path / "trie.zarr"), mode="r")["corpus"],
                                   "trie.zarr/corpus")
    for c in (copy, again):
        assert c.meta == orig.meta
        assert np.array_equal(c.tokens(), orig.tokens())
        assert np.array_equal(c.doc_starts, orig.doc_starts)
        assert np.array_equal(c.train_documents(), orig.train_documents())
        assert c.tokenizer == orig.tokenizer
    assert len(list((tmp_path / "trie.zarr" / "corpus" / "tokens" / "c").iterdir())) > 1


def test_interrupted_copy_never_opens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      small_shards: None) -> None:
    orig = ingest([str(write(tmp_path / "a.txt", "x" * 100 + "y"))], str(tmp_path / "c.zarr"))
    monkeypatch.setattr(BlockWriter, "close", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    root = open_root(str(tmp_path / "t.zarr"), "w")
    with pytest.raises(KeyboardInterrupt):
        copy_corpus(orig, root)
    with pytest.raises(StoreFormatError, match="unfinished"):
        CorpusStore.from_group(root["corpus"], "t.zarr/corpus")


def test_open_corpus_refuses_foreign_old_and_damaged(tmp_path: Path) -> None:
    with pytest.raises(StoreFormatError, match="no store"):
        open_corpus(str(tmp_path / "missing.zarr"))
    store = ingest([str(write(tmp_path / "a.txt", "abcabc"))], str(tmp_path / "c.zarr"))
    g = zarr.open_group(str(tmp_path / "c.zarr"), mode="r+")
    meta = dict(store.meta)
    g.attrs["agpt"] = {**meta, "format_version": 99}
    with pytest.raises(StoreFormatError, match="format version 99"):
        open_corpus(str(tmp_path / "c.zarr"))
    g.attrs["agpt"] = {**meta, "format": "agpt-trie"}
    with pytest.raises(StoreFormatError, match="expected agpt-corpus"):
        open_corpus(str(tmp_path / "c.zarr"))
    g.attrs["agpt"] = {**meta, "n_tokens": 7}
    with pytest.raises(StoreFormatError, match="damaged"):
        open_corpus(str(tmp_path / "c.zarr"))


# -- bad input through the CLI ------------------------------------------------------------------

BAD_INPUTS = [  # (files, extra args, what the message must say)
    ({"a.txt": b""}, [], "empty"),
    ({"a.txt": b"", "b.txt": b""}, ["--tokenizer", "byte"], "empty"),
    ({"a.txt": b"abc\xffdef"}, [], "offset 3 .*--tokenizer byte"),
    ({"a.txt": "é€".encode() + b"\xe2\x82"}, ["--chunk-mb", "0.000001"], "offset 5 .*UTF-8"),
    ({"a.txt": b"ok", "b.txt": b"text\x00\x01bin"}, [], r"b\.txt: NUL byte at offset 4"),
    ({"a.txt": b"a"}, [], "only 1 training token"),
    ({"a.txt": b"ab"}, ["--holdout", "0.5"], "only 1 training token"),
    ({"a.txt": b"abc"}, ["--holdout", "1"], r"--holdout must be a fraction in \[0, 1\)"),
    ({"a.txt": b"abc"}, ["--holdout", "-0.1"], "--holdout"),
    ({"a.txt": b"abc"}, ["--holdout", "nan"], "--holdout"),
    ({"a.txt": b"abc"}, ["--chunk-mb", "0"], "--chunk-mb"),
    ({}, [], "does not exist"),
    ({"d/": b""}, [], "matched no files"),
    ({"a.txt": b"abc"}, ["GLOB"], "matched no files"),
]


def _make_inputs(tmp_path: Path, files: dict[str, bytes]) -> list[str]:
    paths = []
    for name, data in files.items():
        p = tmp_path / "in" / name
        if name.endswith("/"):
            p.mkdir(parents=True)
        else:
            write(p, data)
        paths.append(str(p))
    return paths or [str(tmp_path / "in" / "nothing.txt")]


def assert_one_line_error(code: int, err: str, pattern: str) -> None:
    assert code != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("agpt: error: "), err
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize(("files", "extra", "pattern"), BAD_INPUTS)
def test_bad_input_fails_cleanly(tmp_path: Path, run_cli, files: dict[str, bytes],
                                 extra: list[str], pattern: str) -> None:
    inputs = _make_inputs(tmp_path, files)
    extra = [str(tmp_path / "no*.txt") if a == "GLOB" else a for a in extra]
    out = tmp_path / "c.zarr"
    code, _, err = run_cli("ingest", *inputs, "-o", out, *extra)
    assert_one_line_error(code, err, pattern)
    with pytest.raises(StoreFormatError):
        open_corpus(str(out))


@pytest.mark.parametrize("force", [False, True])
def test_existing_store_is_never_lost(tmp_path: Path, run_cli, force: bool) -> None:
    out = tmp_path / "c.zarr"
    code, _, _ = run_cli("ingest", write(tmp_path / "a.txt", "hello"), "-o", out)
    assert code == 0
    before = tree(out)
    flag = ["--force"] if force else []
    # an existing store is refused without --force; bad input is found before it is touched
    bad = write(tmp_path / "bad.txt", b"\xff") if force else write(tmp_path / "b.txt", "other")
    code, _, err = run_cli("ingest", bad, "-o", out, *flag)
    assert_one_line_error(code, err, "UTF-8" if force else "already exists.*--force")
    assert tree(out) == before
    assert open_corpus(str(out)).tokenizer.decode(open_corpus(str(out)).tokens()) == "hello"


def test_force_replaces_a_store_but_never_other_data(tmp_path: Path, run_cli) -> None:
    out = tmp_path / "c.zarr"
    assert run_cli("ingest", write(tmp_path / "a.txt", "hello"), "-o", out)[0] == 0
    code, out_text, _ = run_cli("ingest", write(tmp_path / "b.txt", "world!"), "-o", out, "--force")
    assert code == 0 and "6 tokens" in out_text
    assert open_corpus(str(out)).n_tokens == 6
    precious = tmp_path / "precious"
    write(precious / "notes.txt", "keep me")
    code, _, err = run_cli("ingest", tmp_path / "a.txt", "-o", precious, "--force")
    assert_one_line_error(code, err, "not an AGPT store")
    assert (precious / "notes.txt").read_text() == "keep me"


def test_interrupted_ingest_never_opens_and_reruns(tmp_path: Path, run_cli,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   small_shards: None) -> None:
    src = write(tmp_path / "a.txt", "to be or not to be, that is the question\n" * 5)
    out = tmp_path / "c.zarr"
    real_write = BlockWriter.write
    calls = []

    def interrupted(self: BlockWriter, values: np.ndarray) -> None:
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        real_write(self, values)

    monkeypatch.setattr(BlockWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ingest([str(src)], str(out), chunk_bytes=8)
    with pytest.raises(StoreFormatError, match="unfinished"):
        open_corpus(str(out))
    calls.clear()
    code, _, err = run_cli("ingest", src, "-o", out, "--chunk-mb", "0.00001")
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    monkeypatch.setattr(BlockWriter, "write", real_write)
    code, _, err = run_cli("ingest", src, "-o", out)  # no --force needed to redo it
    assert code == 0, err
    store = open_corpus(str(out))
    assert store.tokenizer.decode(store.tokens()) == src.read_text()


def test_cli_summary_and_help(tmp_path: Path, run_cli) -> None:
    src = write(tmp_path / "a.txt", "abcdefghij" * 10)
    code, out, err = run_cli("ingest", src, "-o", tmp_path / "c.zarr", "--tokenizer", "byte",
                             "--holdout", "0.2")
    assert code == 0, err
    assert "100 tokens" in out and "80 tokens" in out and "held out 20" in out and "MB/s" in out
    code, out, _ = run_cli("ingest", "--help")
    assert code == 0 and "--holdout" in out and "--documents" in out


def test_console_entry_point(run_cli) -> None:
    code, out, _ = run_cli("ingest", "--help", subprocess=True)
    assert code == 0 and "INPUTS..." in out


# -- demo corpus --------------------------------------------------------------------------------

def test_markdown_to_text() -> None:
    md = ("# Play\n\n## ACT I\n\n_Enter A and B_\n\n**FIRST LORD**  \n__\\[Aside]_  \n"
          "Good morrow\\--sir,  \nfriend—well.\n\n**B**  \n_Exit, with a long\ndirection_\n\n"
          "**C**  \n[Within]_  \n*Sound a horn.*\nHo!\n\n\n\n**D**  \nBye.\n")
    assert markdown_to_text(md) == ("FIRST LORD:\nGood morrow--sir,\nfriend--well.\n\n"
                                    "C:\nHo!\n\nD:\nBye.")


def test_demo_corpus(tmp_path: Path, run_cli) -> None:
    assert len(play_files()) >= 30
    out = tmp_path / "demo.txt"
    code, msg, err = run_cli("demo-corpus", out)
    assert code == 0, err
    text = out.read_text(encoding="utf-8")
    assert len(text) > 3_000_000 and text.isascii()
    for who in ("HAMLET:", "ROMEO:", "MACBETH:", "PROSPERO:", "FALSTAFF:"):
        assert f"\n{who}\n" in text
    assert not any(s in text for s in ("**", "\n#", "_", "\n\n\n"))
    assert text == write_demo_corpus(tmp_path / "again.txt").read_text()  # deterministic
    code, _, err = run_cli("demo-corpus", out)
    assert_one_line_error(code, err, "already exists")
