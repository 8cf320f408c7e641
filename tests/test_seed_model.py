"""The seed's `.model` format: exact round trips, a hand-built file, bad files, the CLI."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from agpt.errors import AgptError
from agpt.model.config import ModelConfig, preset
from agpt.model.params import init_params, n_params, param_specs, views
from agpt.model.seed_format import MAGIC, file_size, read_seed_model, write_seed_model
from agpt.store.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

SYMBOLS65 = "\n" + "".join(chr(c) for c in range(32, 96))


def one_line(err: str) -> bool:
    return err.strip().count("\n") == 0 and "Traceback" not in err and err.strip() != ""


def test_micro_layout() -> None:
    cfg = preset("micro", 65, 16)
    assert n_params(cfg) == 108_481
    assert len(param_specs(cfg)) == 37 == 1 + 16 * cfg.n_layers + 4
    assert file_size(cfg) == 28 + 8 * 37 + 4 * 108_481


def test_write_read_bitwise(tmp_path: Path) -> None:
    cfg = preset("micro", 65, 16)
    params = np.random.default_rng(5).standard_normal(n_params(cfg)).astype(np.float32)
    path = tmp_path / "m.model"
    write_seed_model(path, cfg, params)
    assert path.stat().st_size == file_size(cfg)
    cfg2, back = read_seed_model(path)
    assert cfg2 == cfg and back.dtype == np.float32
    assert back.tobytes() == params.tobytes()
    assert [p.name for p in tmp_path.iterdir()] == ["m.model"]


def _hand_file(d=4, h=2, n=1, f=6, v=3, t=5, *, tamper=None) -> tuple[bytes, list]:
    """A file assembled with struct.pack: tensor i holds 100*i + (0, 1, 2, ...)."""
    dims = [(v, d)]
    for _ in range(n):
        dims += [(d, d), (1, d)] * 4 + [(1, d), (1, d), (d, f), (1, f), (f, d), (1, d),
                                        (1, d), (1, d)]
    dims += [(1, d), (1, d), (d, v), (1, v)]
    out = [struct.pack("<7i", MAGIC, d, h, n, f, v, t)]
    tensors = []
    for i, (r, c) in enumerate(dims):
        vals = [100.0 * i + k for k in range(r * c)]
        if tamper and tamper[0] == i:
            r, c = tamper[1]
        out.append(struct.pack("<2i", r, c) + struct.pack(f"<{len(vals)}f", *vals))
        tensors.append(np.array(vals, np.float32).reshape(r, c))
    return b"".join(out), tensors


def test_hand_assembled_file(tmp_path: Path) -> None:
    raw, tensors = _hand_file()
    path = tmp_path / "h.model"
    path.write_bytes(raw)
    cfg, flat = read_seed_model(path)
    assert cfg == ModelConfig(vocab_size=3, d_model=4, n_heads=2, n_layers=1, d_ff=6, context=5)
    assert len(tensors) == 1 + 16 + 4  # token_emb, 16 per layer, final γ, β, out.w, out.b
    w = views(flat, cfg)
    assert w["tok_emb"].shape == (3, 4) and w["tok_emb"][2, 1] == 9.0  # row-major [V, D]
    assert w["l0.wq.w"][1, 3] == 100 + 7
    assert w["l0.wq.b"].tolist() == [200, 201, 202, 203]              # [1, D] -> (D,)
    assert w["l0.wo.b"].tolist() == [800, 801, 802, 803]
    assert w["l0.ln1.g"][0] == 900 and w["l0.ln1.b"][0] == 1000
    assert w["l0.ff1.w"].shape == (4, 6) and w["l0.ff1.w"][3, 5] == 1100 + 23
    assert w["l0.ff2.w"].shape == (6, 4) and w["l0.ff2.w"][5, 0] == 1300 + 20
    assert w["l0.ln2.b"][3] == 1600 + 3
    assert w["lnf.g"][0] == 1700 and w["lnf.b"][0] == 1800
    assert w["out.w"].shape == (4, 3) and w["out.w"][1, 2] == 1900 + 5  # [D, V]
    assert w["out.b"].tolist() == [2000, 2001, 2002]
    for spec, t in zip(param_specs(cfg), tensors, strict=True):
        assert np.array_equal(w[spec.name].reshape(t.shape), t)
    again = tmp_path / "again.model"
    write_seed_model(again, cfg, flat)
    assert again.read_bytes() == raw


def _refused(path: Path, raw: bytes, match: str) -> None:
    path.write_bytes(raw)
    with pytest.raises(AgptError, match=match) as info:
        read_seed_model(path)
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path: Path) -> None:
    raw, _ = _hand_file()
    p = tmp_path / "bad.model"
    _refused(p, b"XXXX" + raw[4:], "not a seed .model file")
    _refused(p, raw[:20], "truncated")
    _refused(p, raw[:-4], "truncated")
    _refused(p, raw + b"\0\0\0\0", "longer than its header")
    _refused(p, struct.pack("<7i", MAGIC, 4, 3, 1, 6, 3, 5) + raw[28:], "invalid header")
    _refused(p, struct.pack("<7i", MAGIC, 4, 2, 1, 6, -3, 5) + raw[28:], "invalid header")
    bad_dims, _ = _hand_file(tamper=(2, (4, 1)))  # wq.b written as a column
    _refused(p, bad_dims, r"tensor 2 \(l0.wq.b\) is \[4, 1\]")
    nan = bytearray(raw)
    nan[-4:] = struct.pack("<f", float("nan"))
    _refused(p, bytes(nan), "out.b holds NaN")
    with pytest.raises(AgptError, match="no such model file"):
        read_seed_model(tmp_path / "missing.model")


def test_write_refuses_bad_params(tmp_path: Path) -> None:
    cfg = ModelConfig(3, 4, 2, 1, 6, 5)
    p = np.zeros(n_params(cfg), np.float64)
    with pytest.raises(AgptError, match="flat vector"):
        write_seed_model(tmp_path / "a.model", cfg, p[:-1])
    p[3] = 1e300  # overflows float32
    with pytest.raises(AgptError, match="NaN or Inf"):
        write_seed_model(tmp_path / "a.model", cfg, p)
    assert list(tmp_path.iterdir()) == []


# -- CLI -------------------------------------------------------------------------------------

@pytest.fixture
def corpus65(tmp_path: Path, run_cli) -> Path:
    text = tmp_path / "c65.txt"
    text.write_text((SYMBOLS65 * 3 + "HELLO, WORLD\n") * 20)
    out = tmp_path / "c65.zarr"
    assert run_cli("ingest", text, "-o", out)[0] == 0
    return out


def test_cli_export_import_round_trip(tmp_path: Path, run_cli, corpus65: Path) -> None:
    ck = tmp_path / "a.ckpt"
    assert run_cli("init", corpus65, "-o", ck, "--context", "16", "--seed", "4")[0] == 0
    model = tmp_path / "a.model"
    code, out, err = run_cli("export-seed-model", ck, "-o", model)
    assert code == 0, err
    assert "108,481 parameters" in out
    code, out, err = run_cli("import-seed-model", model, "--store", corpus65, "-o", tmp_path / "b.ckpt")
    assert code == 0, err
    a, b = load_checkpoint(str(ck)), load_checkpoint(str(tmp_path / "b.ckpt"))
    assert a.config == b.config and a.params.tobytes() == b.params.tobytes()
    assert a.tokenizer == b.tokenizer and b.opt_state == {}
    code, _, err = run_cli("export-seed-model", ck, "-o", model)  # exists
    assert code == 2 and one_line(err) and "--force" in err
    assert run_cli("export-seed-model", ck, "-o", model, "--force")[0] == 0


def test_cli_export_float64_casts(tmp_path: Path, run_cli) -> None:
    cfg = ModelConfig(3, 4, 2, 1, 6, 5)
    p = init_params(cfg, np.random.default_rng(0), np.float64)
    save_checkpoint(str(tmp_path / "a.ckpt"), Checkpoint(cfg, p, {}, {}, {}))
    assert run_cli("export-seed-model", tmp_path / "a.ckpt", "-o", tmp_path / "a.model")[0] == 0
    cfg2, back = read_seed_model(tmp_path / "a.model")
    assert cfg2 == cfg and back.tobytes() == p.astype(np.float32).tobytes()


def test_cli_import_refusals(tmp_path: Path, run_cli, corpus65: Path) -> None:
    out = tmp_path / "x.ckpt"
    model = tmp_path / "v3.model"
    raw, _ = _hand_file()  # vocabulary 3, the store has 65
    model.write_bytes(raw)
    cases = [
        (raw, "vocabulary of 3 symbols but store"),
        (b"XXXX" + raw[4:], "not a seed .model file"),
        (raw[:100], "truncated"),
    ]
    for data, match in cases:
        model.write_bytes(data)
        code, stdout, err = run_cli("import-seed-model", model, "--store", corpus65, "-o", out)
        assert code == 2 and one_line(err) and match in err, err
        assert not out.exists() and not any(p.name.startswith(".x.ckpt") for p in tmp_path.iterdir())
    code, _, err = run_cli("import-seed-model", tmp_path / "none.model", "--store", corpus65,
                           "-o", out)
    assert code == 2 and one_line(err)
    code, _, err = run_cli("export-seed-model", tmp_path / "none.ckpt", "-o", tmp_path / "n.model")
    assert code == 2 and one_line(err) and not (tmp_path / "n.model").exists()


def test_cli_import_subprocess_no_traceback(tmp_path: Path, run_cli, corpus65: Path) -> None:
    model = tmp_path / "bad.model"
    model.write_bytes(b"MGPT" + b"\0" * 10)
    code, _, err = run_cli("import-seed-model", model, "--store", corpus65, "-o",
                           tmp_path / "x.ckpt", subprocess=True)
    assert code == 2 and one_line(err) and "not a seed .model file" in err
