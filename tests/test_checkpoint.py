"""Checkpoints: exact round trips, atomic saves, refusal of damaged/foreign ones, `agpt init`."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from agpt.errors import AgptError, StoreFormatError
from agpt.model.config import ModelConfig, preset
from agpt.model.params import init_params, n_params, views
from agpt.store import checkpoint as ckmod
from agpt.store.checkpoint import (
    Checkpoint,
    check_vocabulary,
    load_checkpoint,
    rng_from_state,
    rng_to_state,
    save_checkpoint,
)
from agpt.store.corpus import open_corpus

#: 65 distinct symbols, like tinyshakespeare: micro has 108,481 parameters at this vocabulary.
SYMBOLS65 = "\n" + "".join(chr(c) for c in range(32, 96))


def one_line(err: str) -> bool:
    return err.strip().count("\n") == 0 and "Traceback" not in err and err.strip() != ""


def tok_meta(v: int) -> dict:
    return {"tokenizer": "char", "vocab": list(range(32, 32 + v)), "vocab_size": v,
            "token_dtype": "uint8"}


def make_ck(dtype=np.float32, seed: int = 0, vocab: int = 11) -> Checkpoint:
    cfg = ModelConfig(vocab, d_model=8, n_heads=2, n_layers=2, d_ff=12, context=6)
    rng = np.random.default_rng(seed)
    p = init_params(cfg, rng, dtype)
    opt = {"m": rng.standard_normal(p.size).astype(dtype),
           "v": rng.random(p.size).astype(dtype)}
    gen = np.random.default_rng(1234 + seed)
    gen.random(7)  # advance so the state is not a fresh seed
    state = {"step": np.int64(17), "epoch": 2, "lr": 3e-3 / 7, "loss_history": [1.5, 0.1 + 0.2],
             "best": float("inf"), "nan": float("nan"), "flags": (True, None, "x"),
             "rng": rng_to_state(gen), "args": {"optimizer": "rmsprop", "beta2": 0.999}}
    return Checkpoint(cfg, p, opt, tok_meta(vocab), state)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# -- round trip ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_is_bitwise(tmp_path: Path, dtype) -> None:
    ck = make_ck(dtype)
    url = str(tmp_path / "a.ckpt")
    save_checkpoint(url, ck)
    back = load_checkpoint(url)
    assert back.config == ck.config
    assert same_bits(back.params, ck.params)
    assert set(back.opt_state) == {"m", "v"}
    for k in ck.opt_state:
        assert same_bits(back.opt_state[k], ck.opt_state[k])
    assert back.tokenizer == ck.tokenizer
    s = back.state
    assert s["step"] == 17 and type(s["step"]) is int and s["epoch"] == 2
    assert s["lr"] == 3e-3 / 7 and s["loss_history"] == [1.5, 0.1 + 0.2]
    assert s["best"] == float("inf") and np.isnan(s["nan"])
    assert s["flags"] == [True, None, "x"] and s["args"] == ck.state["args"]
    # the RNG continues the same stream bit for bit
    gen = np.random.default_rng(1234)
    gen.random(7)
    assert same_bits(rng_from_state(s["rng"]).random(100), gen.random(100))


def test_weights_readable_by_name(tmp_path: Path) -> None:
    ck = make_ck()
    url = str(tmp_path / "a.ckpt")
    save_checkpoint(url, ck)
    g = zarr.open_group(url, mode="r")
    named = views(ck.params, ck.config)
    for name in ("tok_emb", "l1.wq.w", "l0.ln1.g", "out.b"):
        assert np.array_equal(g[f"params/{name}"][...], named[name])
    assert np.array_equal(g["optimizer/m/l0.ff1.w"][...], views(ck.opt_state["m"], ck.config)["l0.ff1.w"])
    meta = g.attrs["agpt"]
    assert meta["format"] == "agpt-checkpoint" and meta["format_version"] == 1
    assert meta["status"] == "complete" and meta["n_params"] == n_params(ck.config)
    json.dumps(meta, allow_nan=False)  # the attribute is strict JSON


@pytest.mark.parametrize("bitgen", ["PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64"])
def test_rng_state_round_trips_through_json(bitgen: str) -> None:
    gen = np.random.Generator(getattr(np.random, bitgen)(99))
    gen.standard_normal(3)
    gen.integers(0, 2**32, dtype=np.uint32)  # leaves a buffered uint32 half
    d = json.loads(json.dumps(rng_to_state(gen), allow_nan=False))
    again = rng_from_state(d)
    assert same_bits(again.random(50), gen.random(50))
    assert again.integers(0, 2**63, 20).tolist() == gen.integers(0, 2**63, 20).tolist()


def test_rng_from_state_refuses_unknown_generator() -> None:
    with pytest.raises(AgptError, match="unknown RNG bit generator"):
        rng_from_state({"bit_generator": "os.system", "state": {}})


# -- atomic saves ----------------------------------------------------------------------------

def _fail_after(monkeypatch: pytest.MonkeyPatch, n: int, exc: BaseException) -> None:
    real = ckmod.write_array
    calls = {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] > n:
            raise exc
        return real(*a, **kw)

    monkeypatch.setattr(ckmod, "write_array", flaky)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt(),
                                 OSError(errno.ENOSPC, "No space left on device")])
def test_interrupted_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch, exc) -> None:
    url = str(tmp_path / "a.ckpt")
    old = make_ck(seed=0)
    save_checkpoint(url, old)
    _fail_after(monkeypatch, 40, exc)  # half-way: 3 x 37 arrays in all
    expect = AgptError if isinstance(exc, OSError) else type(exc)
    with pytest.raises(expect) as info:
        save_checkpoint(url, make_ck(seed=1))
    if isinstance(exc, OSError):
        assert "previous checkpoint" in str(info.value) and "\n" not in str(info.value)
    back = load_checkpoint(url)
    assert same_bits(back.params, old.params) and same_bits(back.opt_state["v"], old.opt_state["v"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt"]  # no temporary left


def test_interrupted_first_save_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    _fail_after(monkeypatch, 3, RuntimeError("boom"))
    with pytest.raises(RuntimeError):
        save_checkpoint(str(tmp_path / "a.ckpt"), make_ck())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exchange", [True, False])
def test_overwrite_replaces(tmp_path: Path, monkeypatch, exchange: bool) -> None:
    if not exchange:  # filesystems without renameat2(RENAME_EXCHANGE)
        monkeypatch.setattr(ckmod, "_exchange", lambda a, b: False)
    url = str(tmp_path / "a.ckpt")
    save_checkpoint(url, make_ck(seed=0))
    new = make_ck(np.float64, seed=1)
    new.opt_state = {}
    save_checkpoint(url, new)
    back = load_checkpoint(url)
    assert same_bits(back.params, new.params) and back.opt_state == {}
    assert not (Path(url) / "optimizer").exists()  # nothing of the old one survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt"]


def test_overwrite_refusals(tmp_path: Path, run_cli) -> None:
    url = str(tmp_path / "a.ckpt")
    save_checkpoint(url, make_ck())
    with pytest.raises(AgptError, match="already exists"):
        save_checkpoint(url, make_ck(seed=1), overwrite=False)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(AgptError, match="refusing to overwrite"):
        save_checkpoint(str(other), make_ck())
    assert (other / "keep.txt").read_text() == "mine"
    text = tmp_path / "c.txt"
    text.write_text("abcab" * 10)
    assert run_cli("ingest", text, "-o", tmp_path / "c.zarr")[0] == 0
    with pytest.raises(AgptError, match="agpt-corpus store"):
        save_checkpoint(str(tmp_path / "c.zarr"), make_ck())


def test_save_validates(tmp_path: Path) -> None:
    ck = make_ck()
    bad = Checkpoint(ck.config, ck.params[:-1], {}, ck.tokenizer, {})
    with pytest.raises(AgptError, match="flat vector"):
        save_checkpoint(str(tmp_path / "a"), bad)
    bad = Checkpoint(ck.config, ck.params, {"m": ck.params[:3]}, ck.tokenizer, {})
    with pytest.raises(AgptError, match="optimizer slot"):
        save_checkpoint(str(tmp_path / "a"), bad)
    bad = Checkpoint(ck.config, ck.params, {}, ck.tokenizer, {"g": np.random.default_rng()})
    with pytest.raises(AgptError, match="not JSON-able"):
        save_checkpoint(str(tmp_path / "a"), bad)
    assert not (tmp_path / "a").exists()


# -- refusing bad checkpoints ------------------------------------------------------------------

def _set_meta(url: str, **kv) -> None:
    g = zarr.open_group(url, mode="r+")
    meta = dict(g.attrs["agpt"])
    meta.update(kv)
    g.attrs["agpt"] = meta


def _refused(url: str, match: str) -> None:
    with pytest.raises(StoreFormatError, match=match) as info:
        load_checkpoint(url)
    assert "\n" not in str(info.value)


def test_refuses_incomplete(tmp_path: Path) -> None:
    url = str(tmp_path / "a.ckpt")
    save_checkpoint(url, make_ck())
    _set_meta(url, status="building")
    _refused(url, "incomplete checkpoint")


def test_refuses_other_version(tmp_path: Path) -> None:
    url = str(tmp_path / "a.ckpt")
    save_checkpoint(url, make_ck())
    _set_meta(url, format_version=2)
    _refused(url, "format version 2")


def test_refuses_corrupt_and_missing_chunks(tmp_path: Path) -> None:
    url = str(tmp_path / "a.ckpt")
    save_checkpoint(url, make_ck())
    chunk = Path(url, "params", "out.w", "c", "0", "0")
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    _refused(url, "corrupt")
    chunk.unlink()
    _refused(url, "missing")


def test_refuses_config_mismatch(tmp_path: Path) -> None:
    url = str(tmp_path / "a.ckpt")
    ck = make_ck()
    save_checkpoint(url, ck)
    cfg = ck.config.to_dict()
    _set_meta(url, config={**cfg, "d_ff": 16}, n_params=n_params(ModelConfig(**{**cfg, "d_ff": 16})))
    _refused(url, "different config")
    _set_meta(url, config={**cfg, "n_layers": 1},
              n_params=n_params(ModelConfig(**{**cfg, "n_layers": 1})))
    _refused(url, "other tensors than its config")
    _set_meta(url, config={**cfg, "n_heads": 3})
    _refused(url, "invalid model config")


def test_refuses_foreign_and_missing(tmp_path: Path, run_cli) -> None:
    _refused(str(tmp_path / "nope.ckpt"), "no checkpoint at")
    text = tmp_path / "c.txt"
    text.write_text("abcab" * 10)
    assert run_cli("ingest", text, "-o", tmp_path / "c.zarr")[0] == 0
    _refused(str(tmp_path / "c.zarr"), "agpt-corpus store, not a checkpoint")


def test_check_vocabulary() -> None:
    check_vocabulary(tok_meta(11), dict(tok_meta(11)), "x")
    with pytest.raises(AgptError) as info:
        check_vocabulary(tok_meta(11), tok_meta(12), "ck.ckpt on c.zarr")
    msg = str(info.value)
    assert "11" in msg and "12" in msg and "agpt init" in msg and "\n" not in msg
    shifted = {**tok_meta(11), "vocab": list(range(33, 44))}
    with pytest.raises(AgptError, match="same size, different symbols"):
        check_vocabulary(tok_meta(11), shifted, "x")


# -- agpt init ---------------------------------------------------------------------------------

@pytest.fixture
def corpus65(tmp_path: Path, run_cli) -> Path:
    text = tmp_path / "c65.txt"
    text.write_text((SYMBOLS65 * 3 + "HELLO, WORLD\n") * 20)
    out = tmp_path / "c65.zarr"
    code, _, err = run_cli("ingest", text, "-o", out)
    assert code == 0, err
    return out


def test_init_micro_parameter_count(tmp_path: Path, run_cli, corpus65: Path) -> None:
    out = tmp_path / "m.ckpt"
    code, stdout, err = run_cli("init", corpus65, "-o", out)
    assert code == 0, err
    assert "108,481 parameters" in stdout
    ck = load_checkpoint(str(out))
    assert ck.config == preset("micro", 65, 32)  # corpus store: context 32
    assert ck.params.dtype == np.float32 and ck.opt_state == {}
    assert same_bits(ck.params, init_params(ck.config, np.random.default_rng(0)))
    assert ck.tokenizer["vocab_size"] == 65 and ck.state["init"]["seed"] == 0


def test_init_from_trie_and_options(tmp_path: Path, run_cli, corpus65: Path) -> None:
    trie = tmp_path / "t.zarr"
    assert run_cli("build-radix", corpus65, "-o", trie, "-D", "5", "--quiet")[0] == 0
    out = tmp_path / "t.ckpt"
    code, _, err = run_cli("init", trie, "-o", out, "--d-model", "32", "--n-heads", "2",
                           "--dtype", "float64", "--seed", "3")
    assert code == 0, err
    ck = load_checkpoint(str(out))
    assert (ck.config.context, ck.config.d_model, ck.config.n_heads) == (5, 32, 2)
    assert ck.params.dtype == np.float64
    check_vocabulary(ck.tokenizer, open_corpus(str(corpus65)).tokenizer.to_meta(), "x")


def test_init_refusals(tmp_path: Path, run_cli, corpus65: Path) -> None:
    out = tmp_path / "m.ckpt"
    assert run_cli("init", corpus65, "-o", out)[0] == 0
    first = load_checkpoint(str(out)).params
    code, _, err = run_cli("init", corpus65, "-o", out, "--seed", "1")
    assert code == 2 and one_line(err) and "--force" in err
    assert same_bits(load_checkpoint(str(out)).params, first)
    code, _, err = run_cli("init", corpus65, "-o", out, "--seed", "1", "--force")
    assert code == 0, err
    assert not same_bits(load_checkpoint(str(out)).params, first)
    for args in (["--n-heads", "3"], ["--context", "0"]):
        code, _, err = run_cli("init", corpus65, "-o", tmp_path / "x.ckpt", *args)
        assert code == 2 and one_line(err), err
    code, _, err = run_cli("init", tmp_path / "nope.zarr", "-o", tmp_path / "y.ckpt")
    assert code == 2 and one_line(err)
    code, _, err = run_cli("init", out, "-o", tmp_path / "z.ckpt")  # a checkpoint is no store
    assert code == 2 and one_line(err) and "is a checkpoint" in err
    code, _, err = run_cli("init", corpus65, "-o", corpus65, "--force")
    assert code == 2 and one_line(err) and "refusing to overwrite" in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".ckpt") == ["m.ckpt"]


def test_help(run_cli) -> None:
    for cmd in ("init", "import-seed-model", "export-seed-model"):
        code, out, _ = run_cli(cmd, "--help")
        assert code == 0 and "Usage" in out
