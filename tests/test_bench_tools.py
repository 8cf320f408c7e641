"""The benchmark helpers in bench/ (not a package): the Markov corpus generator and measure()."""

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from stores import make_trie

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


markov = _load("markov")
measure_mod = _load("_measure")

WORDS = "the king and queen of a fair court did say that all is well when it ends".split()


def _training_text(n_words: int = 6000, seed: int = 1) -> str:
    """Word salad with punctuation and newlines, ending with its own opening so no context of
    the chain is a dead end (every context seen in training has a successor)."""
    rng = random.Random(seed)
    parts = []
    for _ in range(n_words):
        parts.append(rng.choice(WORDS))
        parts.append(rng.choice([" ", " ", " ", ", ", ".\n"]))
    text = "".join(parts)
    return text + text[:40]


def test_generate_length_alphabet_and_determinism() -> None:
    train = _training_text()
    out = markov.generate(train, order=4, n_chars=5000, seed=7)
    assert len(out) == 5000
    assert set(out) <= set(train)
    assert out == markov.generate(train, order=4, n_chars=5000, seed=7)
    assert out != markov.generate(train, order=4, n_chars=5000, seed=8)


def test_generate_non_ascii_and_small_sizes() -> None:
    train = "héllo wörld ✓ naïve café " * 40
    out = markov.generate(train, order=3, n_chars=700, seed=0, streams=5)
    assert len(out) == 700 and set(out) <= set(train)
    assert markov.generate(train, 3, 0, 0) == ""
    assert len(markov.generate(train, 3, 2, 0)) == 2  # shorter than the order
    with pytest.raises(ValueError):
        markov.generate("abc", order=3, n_chars=10, seed=0)


@pytest.mark.parametrize("order", [1, 3, 6])
def test_chain_only_produces_training_ngrams(order: int) -> None:
    train = _training_text()
    seen = {train[i : i + order + 1] for i in range(len(train) - order)}
    out = markov.generate(train, order=order, n_chars=20_000, seed=3)  # one chain: no seams
    grams = {out[i : i + order + 1] for i in range(len(out) - order)}
    assert grams <= seen


def test_segments_are_seamless_inside(tmp_path: Path) -> None:
    """With many chains, (k+1)-grams are from training except across segment boundaries; the
    file writer gives the same text as generate()."""
    train, k, n, streams = _training_text(), 5, 30_000, 8
    out = markov.generate(train, order=k, n_chars=n, seed=5, streams=streams)
    seen = {train[i : i + k + 1] for i in range(len(train) - k)}
    seg = -(-n // streams)
    bad = [i for i in range(n - k) if out[i : i + k + 1] not in seen]
    assert all(any(0 < b * seg - i <= k for b in range(1, streams)) for i in bad)
    model = markov.fit(train, k)
    path = tmp_path / "out.txt"
    assert markov.generate_file(model, n, 5, path, streams=streams) == n
    assert path.read_text(encoding="utf-8") == out


def test_markov_cli(tmp_path: Path) -> None:
    src = tmp_path / "train.txt"
    src.write_text(_training_text(), encoding="utf-8")
    dst = tmp_path / "gen.txt"
    r = measure_mod.measure(
        [
            sys.executable,
            BENCH / "markov.py",
            "--train",
            src,
            "--order",
            "4",
            "--chars",
            "100000",
            "--seed",
            "0",
            "-o",
            dst,
        ]
    )
    assert r["returncode"] == 0, r["stderr_tail"]
    assert dst.stat().st_size == 100_000
    bad = measure_mod.measure(
        [
            sys.executable,
            BENCH / "markov.py",
            "--train",
            tmp_path / "missing.txt",
            "--size-mb",
            "1",
            "-o",
            dst,
        ]
    )
    assert bad["returncode"] == 2 and "missing.txt" in bad["stderr_tail"]


def test_measure_counts_child_processes() -> None:
    child = "import time; b = b'x' * 200_000_000; time.sleep(0.5)"  # ~200 MB, all touched
    parent = (
        f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}]); sys.exit(3)"
    )
    r = measure_mod.measure([sys.executable, "-c", parent], poll_s=0.02)
    assert r["returncode"] == 3
    assert r["peak_rss_mb"] >= 150
    assert r["peak_rss_main_mb"] < 150  # the memory was in the child
    assert r["max_procs"] >= 2
    assert 0.5 <= r["wall_s"] < 30


def test_measure_missing_command_and_tables() -> None:
    r = measure_mod.measure(["agpt-no-such-command-xyz"])
    assert r["returncode"] == 127 and "could not start" in r["stderr_tail"]
    assert measure_mod.median([3.0, 1.0, 2.0]) == 2.0
    assert measure_mod.summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    text = measure_mod.format_table([["a", 1.5], ["bb", 12.25]], header=["case", "s"])
    assert text.splitlines()[2].split() == ["a", "1.50"]
    md = measure_mod.format_table([["a", 1.5]], header=["case", "s"], markdown=True)
    assert md.splitlines()[1] == "|------|-----:|"


def test_dead_end_backs_off() -> None:
    """'YZ' ends the training text and occurs nowhere else: chains reaching it restart."""
    train = "abcabcabdabcXYZ"
    out = markov.generate(train, order=2, n_chars=5000, seed=3, streams=7)
    assert len(out) == 5000 and set(out) <= set(train)
    assert "XYZ" in out


def test_gc_pauses_reports_each_epoch_and_what_the_freeze_holds(tmp_path: Path) -> None:
    """bench/gc_pauses.py: one record per epoch, with the trainer's freeze and without it."""
    url = make_trie(tmp_path, ["the cat sat on the mat. the dog sat on the log. " * 6], 5,
                    "bigram")
    frozen = {}
    for arm in ([], ["--no-freeze"]):
        out = subprocess.run(
            [sys.executable, str(BENCH / "gc_pauses.py"), *arm, "train", url, "-o",
             str(tmp_path / "c.ckpt"), "--epochs", "2", "--device", "cpu", "--model", "micro",
             "--quiet", "--force"], check=True, capture_output=True, text=True).stdout
        recs = [json.loads(x) for x in out.splitlines() if '"gc"' in x]
        assert [r["epoch"] for r in recs] == [1, 2]
        assert all(r["young_passes"] > 0 and r["seconds"] > 0 for r in recs)
        assert all(len(p) == 2 and p[1] >= 0 for r in recs for p in r["full_passes"])
        frozen[bool(arm)] = min(r["frozen"] for r in recs)
    assert frozen[False] > 10_000 > frozen[True]
