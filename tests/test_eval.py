"""Evaluation: sliding-window perplexity against a per-token oracle, the seed protocol,
sampling, metric plots, and the `agpt perplexity/sample/plot` commands."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from agpt.backend import get_backend
from agpt.errors import AgptError
from agpt.eval import (
    Plan,
    perplexity,
    plot_metrics,
    read_metrics,
    sample,
    score,
    seed_plan,
    segments_plan,
    sliding_plan,
)
from agpt.model.config import ModelConfig, preset
from agpt.model.gpt import Batch, forward, logits_of
from agpt.model.layout import WindowLayout
from agpt.model.params import init_params, views
from agpt.tokenize import Tokenizer

CFG = ModelConfig(vocab_size=7, d_model=8, n_heads=2, n_layers=2, d_ff=16, context=5)
BE = get_backend("cpu", "float64")


@pytest.fixture(scope="module")
def flat() -> np.ndarray:
    return init_params(CFG, np.random.default_rng(1), np.float64)


@pytest.fixture(scope="module")
def stream() -> np.ndarray:
    return np.random.default_rng(2).integers(0, CFG.vocab_size, 40).astype(np.uint8)


def direct_nll(flat: np.ndarray, ctx: np.ndarray, target: int) -> float:
    """-log p(target | ctx) from one forward over ctx alone (the oracle)."""
    ctx = np.asarray(ctx, np.int64)
    y, _ = forward(CFG, BE, flat, Batch(ctx, WindowLayout(1, len(ctx))))
    z = logits_of(CFG, BE, flat, y[-1:])[0]
    m = z.max()
    return float(np.log(np.exp(z - m).sum()) + m - z[target])


def oracle(flat: np.ndarray, h: np.ndarray, n: int, s: int) -> np.ndarray:
    """Per-token NLL of targets 1..M-1 with the documented context of each target."""
    m = len(h)
    out = []
    for t in range(1, m):
        if s == 1 or t <= n:
            a = max(0, t - n)
        else:
            a = min(-(-(t - n) // s) * s, m - 1 - n)   # its window's start (or the tail's)
        out.append(direct_nll(flat, h[a:t], int(h[t])))
    return np.array(out)


@pytest.mark.parametrize("m,n,s", [(40, 5, 1), (40, 5, 2), (40, 5, 3), (38, 5, 5), (4, 5, 1),
                                   (17, 4, 4)])
def test_sliding_window_equals_per_token_oracle(flat, stream, m, n, s):
    h = stream[:m]
    plan = sliding_plan(m, n, s)
    assert plan.n_scored == m - 1
    total, per = score(CFG, BE, flat, h, plan, batch_rows=12, keep=True)
    want = oracle(flat, h, n, s)
    np.testing.assert_allclose(per, want, rtol=1e-10, atol=1e-12)
    assert total == pytest.approx(want.sum(), rel=1e-12)
    if s == 1 and m - 1 > n:  # one window per token, each of exactly N tokens after the first
        assert np.all(plan.length == n) and plan.first[0] == 0 and np.all(plan.first[1:] == n - 1)


def test_batch_size_does_not_change_scores(flat, stream):
    plan = sliding_plan(len(stream), 5, 2)
    a = score(CFG, BE, flat, stream, plan, batch_rows=1, keep=True)[1]
    b = score(CFG, BE, flat, stream, plan, batch_rows=10_000, keep=True)[1]
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_documents_are_scored_separately(flat, stream):
    plan = segments_plan(np.array([[0, 15], [15, 16], [16, 40]]), 5, 1)
    per = score(CFG, BE, flat, stream, plan, keep=True)[1]
    want = np.concatenate([oracle(flat, stream[0:15], 5, 1), oracle(flat, stream[16:40], 5, 1)])
    np.testing.assert_allclose(per, want, rtol=1e-10)


def test_uniform_model_has_ppl_equal_to_vocabulary(flat, stream):
    z = flat.copy()
    v = views(z, CFG)
    v["out.w"][...] = 0
    v["out.b"][...] = 0
    r = perplexity(CFG, BE, z, stream, sliding_plan(len(stream), 5, 1), context=5, stride=1,
                   protocol="heldout", source="s")
    assert r.ppl == pytest.approx(CFG.vocab_size, rel=1e-12)
    assert r.bits_per_token == pytest.approx(math.log2(CFG.vocab_size), rel=1e-12)
    assert r.tokens == len(stream) - 1


@pytest.mark.parametrize("s", [1, 3])
@pytest.mark.parametrize("k", [1, 6, 7, 20, 39, 100])
def test_max_tokens_scores_the_first_m(flat, stream, s, k):
    full = sliding_plan(len(stream), 5, s)
    cut = full.limit(k)
    assert cut.n_scored == min(k, full.n_scored)
    a = score(CFG, BE, flat, stream, full, keep=True)[1]
    b = score(CFG, BE, flat, stream, cut, keep=True)[1]
    np.testing.assert_allclose(b, a[:cut.n_scored], rtol=1e-12)


def test_seed_plan_positions_and_context(flat, stream):
    plan = seed_plan(len(stream), positions=6, context=4)
    assert plan.n_scored == 6
    assert np.all(plan.length == 4)
    per = score(CFG, BE, flat, stream, plan, keep=True)[1]
    want = [direct_nll(flat, stream[t - 4:t], int(stream[t])) for t in range(4, 10)]
    np.testing.assert_allclose(per, want, rtol=1e-10)
    p = seed_plan(2000)                               # defaults: 128-token warm-up, 1000 positions
    assert p.n_scored == 1000 and p.start[0] == 0 and p.start[-1] == 999
    assert np.all(p.length == 128) and np.all(p.first == 127)
    with pytest.raises(AgptError, match="lower --positions"):
        seed_plan(1127)


def test_plan_arguments_are_checked():
    with pytest.raises(AgptError, match="--stride"):
        sliding_plan(10, 4, 5)
    with pytest.raises(AgptError, match="--context"):
        sliding_plan(10, 0, 1)
    assert sliding_plan(1, 4).n_scored == 0
    assert Plan.concat([]).n_scored == 0


def test_seed_protocol_random_micro_on_tinyshakespeare(tiny_shakespeare):
    text = tiny_shakespeare.read_text()
    tok = Tokenizer.from_text(text)
    assert tok.vocab_size == 65
    ids = tok.encode(text[:5000])
    cfg = preset("micro", 65)
    flat = init_params(cfg, np.random.default_rng(0))
    r = perplexity(cfg, get_backend("cpu"), flat, ids, seed_plan(len(ids)), context=128,
                   stride=1, protocol="seed", source="tinyshakespeare")
    print(f"random micro, seed protocol: PPL {r.ppl:.2f} (uniform would be 65)")
    assert r.tokens == 1000
    assert 100 < r.ppl < 260


# -- sampling ----------------------------------------------------------------------------------


def test_sample_is_deterministic_and_top1_is_greedy(flat):
    a = sample(CFG, BE, flat, [1, 2], 30, temperature=1.0, seed=7)
    assert len(a) == 30 and a.min() >= 0 and a.max() < CFG.vocab_size
    assert np.array_equal(a, sample(CFG, BE, flat, [1, 2], 30, temperature=1.0, seed=7))
    others = [sample(CFG, BE, flat, [1, 2], 30, temperature=1.0, seed=s) for s in range(1, 4)]
    assert any(not np.array_equal(a, o) for o in others)
    greedy = sample(CFG, BE, flat, [1, 2], 30, temperature=0)
    assert np.array_equal(greedy, sample(CFG, BE, flat, [1, 2], 30, top_k=1, seed=3))
    assert np.array_equal(greedy, sample(CFG, BE, flat, [1, 2], 30, temperature=0, seed=9))


def test_sample_uses_only_the_last_context_tokens(flat):
    tail = [3, 1, 4, 1, 5]                               # CFG.context == 5
    a = sample(CFG, BE, flat, [0, 0, 6, *tail], 10, temperature=0)
    b = sample(CFG, BE, flat, [2, *tail], 10, temperature=0)
    assert np.array_equal(a, b)


def test_sample_top_k_restricts_choices(flat):
    from agpt.eval.sample import next_token

    rng = np.random.default_rng(0)
    z = np.array([0.0, 5.0, 4.0, -1.0, 3.0])
    picks = {next_token(z, 5.0, 2, rng) for _ in range(200)}
    assert picks == {1, 2}
    with pytest.raises(AgptError, match="temperature"):
        sample(CFG, BE, flat, [1], 3, temperature=-1)
    with pytest.raises(AgptError, match="empty"):
        sample(CFG, BE, flat, [], 3)


# -- plots -------------------------------------------------------------------------------------


def _metrics(path: Path, n: int = 20, evals: bool = True) -> Path:
    lines = []
    for s in range(1, n + 1):
        loss = 4.2 * math.exp(-s / 10) + 1.5
        lines.append({"event": "step", "step": s, "epoch": s // 10, "loss": loss, "lr": 3e-3})
        if evals and s % 10 == 0:
            lines.append({"event": "eval", "step": s, "epoch": s // 10, "loss": loss, "lr": 3e-3,
                          "heldout_nll": loss + 0.1, "heldout_ppl": math.exp(loss + 0.1)})
            lines.append({"event": "epoch", "step": s, "epoch": s // 10, "loss": loss, "lr": 3e-3})
    path.write_text("\n".join(json.dumps(d) for d in lines) + "\n")
    return path


def test_plot_writes_png(tmp_path):
    a = _metrics(tmp_path / "trie.jsonl")
    b = _metrics(tmp_path / "window.jsonl", 30, evals=False)
    c = read_metrics(a)
    assert len(c.train) == 20 and len(c.heldout) == 2 and len(c.epochs) == 2
    out = plot_metrics([a, b], tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("bad,line", [("{not json", 2), ('[1, 2]', 2), ('{"event": "step"}', 2),
                                      ('{"event": "eval", "step": 3}', 2),
                                      ('{"event": "step", "step": 1, "loss": "x"}', 2)])
def test_plot_rejects_malformed_lines(tmp_path, bad, line):
    p = tmp_path / "m.jsonl"
    p.write_text('{"event": "step", "step": 1, "epoch": 0, "loss": 2.0, "lr": 0.1}\n' + bad + "\n")
    with pytest.raises(AgptError, match=f"m.jsonl:{line}:"):
        read_metrics(p)


# -- command line ------------------------------------------------------------------------------

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        "\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n") * 6


@pytest.fixture
def store_and_ckpt(tmp_path):
    """A corpus store (20% held out) and a random checkpoint over its vocabulary."""
    ck_mod = pytest.importorskip("agpt.store.checkpoint")
    from agpt.ingest import ingest

    src = tmp_path / "tiny.txt"
    src.write_text(TEXT)
    store = ingest([src], str(tmp_path / "tiny.zarr"), holdout=0.2)
    cfg = preset("micro", store.vocab_size, context=8)
    flat = init_params(cfg, np.random.default_rng(0))
    ckpt = tmp_path / "ck.zarr"
    ck_mod.save_checkpoint(str(ckpt), ck_mod.Checkpoint(cfg, flat, {}, store.tokenizer.to_meta(),
                                                        {}))
    return store, ckpt, cfg, flat


def _one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, err


def test_cli_perplexity_store_matches_library(run_cli, store_and_ckpt):
    store, ckpt, cfg, flat = store_and_ckpt
    code, out, err = run_cli("perplexity", ckpt, "--store", store.url, "--json", "--device", "cpu")
    assert code == 0, err
    d = json.loads(out)
    ho = store.heldout_tokens()
    r = perplexity(cfg, get_backend("cpu"), flat, ho, sliding_plan(len(ho), 8), context=8,
                   stride=1, protocol="heldout", source="")
    assert d["tokens"] == len(ho) - 1 and d["context"] == 8 and d["stride"] == 1
    assert d["nll"] == pytest.approx(r.nll, rel=1e-6)
    assert d["ppl"] == pytest.approx(math.exp(d["nll"]))
    assert d["bits_per_token"] == pytest.approx(d["nll"] / math.log(2))
    code, out, err = run_cli("perplexity", ckpt, "--store", store.url, "--max-tokens", "10",
                             "--stride", "4", "--context", "6", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert (d["tokens"], d["context"], d["stride"]) == (10, 6, 4)
    code, out, err = run_cli("perplexity", ckpt, "--store", store.url)
    assert code == 0, err
    assert "PPL" in out and "bits/token" in out and "tokens scored" in out


def test_cli_perplexity_on_a_trie_store_scores_its_corpus(run_cli, store_and_ckpt, tmp_path):
    store, ckpt, cfg, flat = store_and_ckpt
    trie = tmp_path / "tiny.trie"
    code, _, err = run_cli("build-radix", store.url, "-o", trie, "-D", "3", "--quiet")
    assert code == 0, err
    a = json.loads(run_cli("perplexity", ckpt, "--store", store.url, "--json")[1])
    b = json.loads(run_cli("perplexity", ckpt, "--store", trie, "--json")[1])
    assert (a["tokens"], a["nll"]) == (b["tokens"], b["nll"])


def test_cli_perplexity_text_and_seed_protocol(run_cli, store_and_ckpt, tmp_path):
    store, ckpt, cfg, flat = store_and_ckpt
    f = tmp_path / "eval.txt"
    f.write_text(TEXT[:300])
    code, out, err = run_cli("perplexity", ckpt, "--text", f, "--json")
    assert code == 0, err
    assert json.loads(out)["tokens"] == 299
    code, out, err = run_cli("perplexity", ckpt, "--store", store.url, "--protocol", "seed",
                             "--positions", "50")
    assert code == 0, err
    assert "1000" not in out and "50 tokens scored" in out and "context 128" in out
    assert "training text" in out
    code, out, err = run_cli("perplexity", ckpt, "--store", store.url, "--protocol", "seed",
                             "--positions", "50", "--json")
    d = json.loads(out)
    ids = store.tokens()
    r = perplexity(cfg, get_backend("cpu"), flat, ids, seed_plan(len(ids), 50), context=128,
                   stride=1, protocol="seed", source="")
    assert d["protocol"] == "seed" and d["nll"] == pytest.approx(r.nll, rel=1e-6)


def test_cli_perplexity_errors(run_cli, store_and_ckpt, tmp_path):
    store, ckpt, cfg, flat = store_and_ckpt
    _one_line_error(*run_cli("perplexity", tmp_path / "nope.zarr", "--store", store.url)[::2],
                    "nope.zarr")
    bad = tmp_path / "bad.txt"
    bad.write_text("First Citizen: what ~ now\n")
    _one_line_error(*run_cli("perplexity", ckpt, "--text", bad)[::2], "'~'", "bad.txt")
    # a checkpoint over another vocabulary
    from agpt.ingest import ingest
    from agpt.store.checkpoint import Checkpoint, save_checkpoint

    other_src = tmp_path / "other.txt"
    other_src.write_text("abcdefg hij\n" * 50)
    other = ingest([other_src], str(tmp_path / "other.zarr"), holdout=0.2)
    ocfg = preset("micro", other.vocab_size, context=8)
    ock = tmp_path / "other_ck.zarr"
    save_checkpoint(str(ock), Checkpoint(ocfg, init_params(ocfg, np.random.default_rng(0)), {},
                                         other.tokenizer.to_meta(), {}))
    _one_line_error(*run_cli("perplexity", ock, "--store", store.url)[::2], "vocabulary")
    _one_line_error(*run_cli("perplexity", ckpt)[::2], "--store")
    _one_line_error(*run_cli("perplexity", ckpt, "--store", store.url, "--stride", "9")[::2],
                    "--stride")
    noho = ingest([tmp_path / "tiny.txt"], str(tmp_path / "noho.zarr"), holdout=0)
    _one_line_error(*run_cli("perplexity", ckpt, "--store", noho.url)[::2], "held-out")


def test_cli_sample(run_cli, store_and_ckpt):
    store, ckpt, cfg, flat = store_and_ckpt
    code, a, err = run_cli("sample", ckpt, "--prompt", "First", "--length", "40", "--seed", "3")
    assert code == 0, err
    assert a.startswith("First") and len(a.rstrip("\n")) >= 5
    assert run_cli("sample", ckpt, "--prompt", "First", "--length", "40", "--seed", "3")[1] == a
    code, g, err = run_cli("sample", ckpt, "--temperature", "0", "--length", "20")
    assert code == 0 and g.startswith("\n"), err
    _one_line_error(*run_cli("sample", ckpt, "--prompt", "a~")[::2], "'~'")


def test_cli_plot(run_cli, tmp_path):
    m = _metrics(tmp_path / "run.jsonl")
    code, out, err = run_cli("plot", m, "-o", tmp_path / "c.png")
    assert code == 0, err
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"event": "step", "step": 1, "loss": 1.0}\n\n{oops\n')
    _one_line_error(*run_cli("plot", bad, "-o", tmp_path / "d.png")[::2], "bad.jsonl:3")
    assert not (tmp_path / "d.png").exists()
