"""`agpt train` / `agpt train-window`: optimizers, resume, NaN, interruption, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from stores import make_trie

from agpt.store.checkpoint import load_checkpoint, save_checkpoint
from agpt.train import trie_trainer, window_trainer
from agpt.train.optim import OptimConfig, Optimizer, lr_at

TEXT = "the cat sat on the mat. the dog sat on the log. " * 6


@pytest.fixture
def store(tmp_path: Path) -> str:
    return make_trie(tmp_path, [TEXT], 6, "bigram", holdout=0.1)


def fast(*extra: object) -> list[str]:
    return ["--model", "micro", "--quiet", "--device", "cpu", "--memory-budget", "64MB", *map(str, extra)]


def interrupt_on_call(monkeypatch, module, n: int):
    """Make module.loss_and_grad raise KeyboardInterrupt on its n-th call; return the real one."""
    real = module.loss_and_grad
    calls = {"n": 0}

    def interrupting(*args, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(module, "loss_and_grad", interrupting)
    return real


def params(url: str) -> np.ndarray:
    return load_checkpoint(url).params


def test_train_two_epochs_equals_one_plus_resume(tmp_path: Path, store: str, run_cli) -> None:
    a, b = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    common = ["--epochs", 2, "--optimizer", "adamw", "--schedule", "cosine", "--shuffle"]
    assert run_cli("train", store, "-o", a, *fast(*common))[0] == 0
    assert run_cli("train", store, "-o", b, *fast(*common, "--until-epoch", 1))[0] == 0
    assert load_checkpoint(str(b)).state["position"]["epoch"] == 1
    code, out, err = run_cli("train", store, "-o", b, "--resume", *fast(*common))
    assert code == 0, err
    assert np.array_equal(params(str(a)), params(str(b)))
    ca, cb = load_checkpoint(str(a)), load_checkpoint(str(b))
    assert all(np.array_equal(ca.opt_state[k], cb.opt_state[k]) for k in ca.opt_state)
    lines = [json.loads(x) for x in (tmp_path / "a.ckpt.metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x["event"] == "step"]
    assert len(steps) == 2 * json.loads(out)["updates_per_epoch"]
    assert {"loss", "lr", "rows_per_s", "rss_mb", "epoch", "step"} <= set(steps[0])


def test_interrupted_run_resumes_exactly(tmp_path: Path, store: str, run_cli, monkeypatch) -> None:
    a, b = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    common = ["--epochs", 2, "--optimizer", "momentum", "--lr", "0.01"]
    assert run_cli("train", store, "-o", a, *fast(*common))[0] == 0
    real = interrupt_on_call(monkeypatch, trie_trainer, 5)
    code, _, err = run_cli("train", store, "-o", b, *fast(*common))
    assert code == 130 and "--resume" in err and "Traceback" not in err
    pos = load_checkpoint(str(b)).state["position"]
    assert (pos["epoch"], pos["unit"]) == (0, 4)
    monkeypatch.setattr(trie_trainer, "loss_and_grad", real)
    assert run_cli("train", store, "-o", b, "--resume", *fast(*common))[0] == 0
    assert np.array_equal(params(str(a)), params(str(b)))


def test_a_run_freezes_what_outlives_it_and_unfreezes_at_its_end(tmp_path: Path, store: str,
                                                                  run_cli, monkeypatch) -> None:
    """The objects alive once training begins are frozen (the cyclic collector's full passes
    walked them with the GIL held: 59-79 ms between GPU epochs) and unfrozen when the run
    ends, interrupted too: in-process callers keep the collector they had."""
    import gc

    from agpt.train.session import Session
    seen: list[int] = []
    log = Session.log

    def logging(self, event: str, **kw: object) -> None:
        if event == "epoch":
            seen.append(gc.get_freeze_count())
        log(self, event, **kw)

    monkeypatch.setattr(Session, "log", logging)
    gc.unfreeze()
    assert run_cli("train", store, "-o", tmp_path / "a.ckpt", *fast("--epochs", 2))[0] == 0
    assert len(seen) == 2 and min(seen) > 1000
    assert gc.get_freeze_count() == 0
    interrupt_on_call(monkeypatch, trie_trainer, 3)
    assert run_cli("train", store, "-o", tmp_path / "b.ckpt", *fast("--epochs", 2))[0] == 130
    assert gc.get_freeze_count() == 0


def test_nan_stops_and_names_the_last_good_checkpoint(tmp_path: Path, store: str, run_cli,
                                                     monkeypatch) -> None:
    out = tmp_path / "m.ckpt"
    assert run_cli("train", store, "-o", out, *fast("--epochs", 1))[0] == 0
    good = params(str(out))
    real = trie_trainer.loss_and_grad

    def nan_later(cfg, be, flat, batch, grad, truncated=False):
        loss = real(cfg, be, flat, batch, grad, truncated)
        grad[3] = np.nan                    # one poisoned gradient entry
        return loss

    monkeypatch.setattr(trie_trainer, "loss_and_grad", nan_later)
    code, _, err = run_cli("train", store, "-o", out, "--resume", *fast("--epochs", 2))
    assert code == 3 and "NaN/Inf" in err and str(out) in err and "Traceback" not in err
    assert np.array_equal(params(str(out)), good)      # the good checkpoint is untouched


def test_nan_in_the_starting_model(tmp_path: Path, store: str, run_cli) -> None:
    init = tmp_path / "init.ckpt"
    assert run_cli("init", store, "-o", init)[0] == 0
    ck = load_checkpoint(str(init))
    ck.params[0] = np.inf
    save_checkpoint(str(init), ck)
    code, _, err = run_cli("train", store, "-o", tmp_path / "m.ckpt", "--init", init, *fast())
    assert code == 3 and "NaN/Inf" in err
    assert not (tmp_path / "m.ckpt").exists()


def test_seed_recipe_and_per_epoch_steps(tmp_path: Path, store: str, run_cli) -> None:
    code, out, err = run_cli("train", store, "-o", tmp_path / "s.ckpt", "--recipe", "seed",
                             *fast("--epochs", 1))
    assert code == 0, err
    res = json.loads(out)
    st = load_checkpoint(str(tmp_path / "s.ckpt")).state["settings"]
    assert st["optimizer"]["name"] == "rmsprop" and st["trie"]["entropy_lambda"] == 1.0
    assert res["lr"] == pytest.approx(3e-3 * 65 / res["updates_per_epoch"])
    code, out, _ = run_cli("train", store, "-o", tmp_path / "e.ckpt", "--step", "epoch",
                           "--gradient", "truncated", "--mass-weight", "sqrt", *fast("--epochs", 2))
    assert code == 0 and json.loads(out)["update"] == 2


def test_memory_budget_changes_nothing_but_memory(tmp_path: Path, store: str, run_cli) -> None:
    outs = []
    for budget in ("64MB", "2MB"):
        o = tmp_path / f"{budget}.ckpt"
        args = ["--dtype", "float64", "--optimizer", "sgd", "--lr", "0.1"]
        code, _, err = run_cli("train", store, "-o", o, "--model", "micro", "--quiet",
                               "--device", "cpu", "--memory-budget", budget, *args)
        assert code == 0, err
        outs.append(params(str(o)))
    assert np.allclose(outs[0], outs[1], rtol=0, atol=1e-12)
    code, _, err = run_cli("train", store, "-o", tmp_path / "x.ckpt", *fast()[:-2],
                           "--memory-budget", "1KB")
    assert code == 2 and "cannot hold one context" in err


def test_window_baseline_trains_and_resumes(tmp_path: Path, store: str, run_cli,
                                            monkeypatch) -> None:
    a, b = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    common = ["--seq-len", 6, "--batch-size", 8, "--starts", "random", "--steps", 6,
              "--checkpoint-every", 3, "--optimizer", "adam", "--quiet", "--device", "cpu"]
    code, out, err = run_cli("train-window", store, "-o", a, *common)
    assert code == 0, err
    real = interrupt_on_call(monkeypatch, window_trainer, 5)
    assert run_cli("train-window", store, "-o", b, *common)[0] == 130
    monkeypatch.setattr(window_trainer, "loss_and_grad", real)
    assert run_cli("train-window", store, "-o", b, "--resume", *common)[0] == 0
    assert np.array_equal(params(str(a)), params(str(b)))
    code, _, err = run_cli("train-window", store, "-o", tmp_path / "all.ckpt", "--quiet",
                           "--starts", "all", "--seq-len", 6, "--batch-size", 32)
    assert code == 0, err
    lines = (tmp_path / "a.ckpt.metrics.jsonl").read_text().splitlines()
    assert sum(json.loads(x)["event"] == "step" for x in lines) == 6
    assert "positions_per_s" in json.loads(lines[0])
    # same model, different trainer: a window checkpoint does not resume as a trie run
    code, _, err = run_cli("train", store, "-o", a, "--resume", *fast())
    assert code == 2 and "window" in err


@pytest.mark.parametrize("bad,msg", [
    (["--optimizer", "adam", "--resume"], "optimizer"),
    (["--epochs", "0"], "--epochs"),
    (["--lr", "-1"], "--lr"),
])
def test_bad_settings(tmp_path: Path, store: str, run_cli, bad, msg) -> None:
    out = tmp_path / "m.ckpt"
    assert run_cli("train", store, "-o", out, *fast("--optimizer", "sgd"))[0] == 0
    if "--resume" not in bad:
        out = tmp_path / "n.ckpt"
    code, _, err = run_cli("train", store, "-o", out, *fast(*bad))
    assert code == 2 and msg in err and "Traceback" not in err


def test_wrong_vocabulary_missing_store_and_existing_output(tmp_path: Path, store: str,
                                                           run_cli) -> None:
    other = make_trie(tmp_path / "o", ["xyzxyzxyzw" * 5], 4) if (tmp_path / "o").mkdir() is None else ""
    init = tmp_path / "other.ckpt"
    assert run_cli("init", other, "-o", init)[0] == 0
    code, _, err = run_cli("train", store, "-o", tmp_path / "m.ckpt", "--init", init, *fast())
    assert code == 2 and "vocab" in err.lower() and "Traceback" not in err
    code, _, err = run_cli("train", tmp_path / "nope.zarr", "-o", tmp_path / "m.ckpt", *fast())
    assert code == 2 and "nope.zarr" in err
    assert run_cli("train", store, "-o", tmp_path / "m.ckpt", *fast())[0] == 0
    code, _, err = run_cli("train", store, "-o", tmp_path / "m.ckpt", *fast())
    assert code == 2 and "--resume" in err


def test_optimizers_and_schedules() -> None:
    c = OptimConfig("adamw", lr=1.0, schedule="warmup-cosine", warmup_steps=2, min_lr=0.1)
    assert [round(lr_at(c, s, 6), 4) for s in range(6)] == [0.5, 1.0, 1.0, 0.8682, 0.55, 0.2318]
    for name in ("sgd", "momentum", "adam", "adamw", "rmsprop"):
        p = np.array([1.0, -2.0])
        opt = Optimizer(OptimConfig(name, lr=0.1), np, p)
        for _ in range(50):
            opt.step(p, 2 * p.copy(), 0.1)           # minimise |p|^2
        assert np.abs(p).max() < 1.0, name
    # the seed's rmsprop: no bias correction -> first step is lr * g / sqrt((1-β)g²)
    p = np.array([1.0])
    Optimizer(OptimConfig("rmsprop", lr=0.1, beta2=0.999, eps=0), np, p).step(p, np.array([2.0]), 0.1)
    assert p[0] == pytest.approx(1.0 - 0.1 / np.sqrt(0.001))
    g = np.array([3.0, 4.0])
    assert Optimizer(OptimConfig("sgd", clip=1.0), np, g).clip(g) == 5.0 and np.isclose(np.hypot(*g), 1.0)


def test_prefetch_keeps_order_starts_at_once_and_bounds_its_lead() -> None:
    """Units come back in the visiting order; work starts before anyone iterates; the lead is
    at least `ahead` units, and past that only while the rows in flight are under the cap."""
    import threading

    started = threading.Event()
    calls: list[int] = []

    def make(i: int) -> int:
        calls.append(i)
        started.set()
        return 10 * i

    rows = {i: (1000 if i in (5, 6) else 10) for i in range(12)}
    order = [3, 0, 7, 5, 6, 1, 11, 2, 4, 8, 9, 10]
    p = trie_trainer.Prefetch(make, order, workers=2, ahead=2, rows=rows.__getitem__,
                              rows_ahead=100)
    assert started.wait(5)                    # reading began before the first next()
    seen = []
    for i, item in p:
        assert item == 10 * i
        seen.append(i)
        lead = [j for j, _, _ in p._pending]
        assert len(lead) >= min(2, len(order) - len(seen))
        # past `ahead` units, one more unit only while the rows before it were under the cap
        assert sum(rows[j] for j in lead[:-1]) < 100 or len(lead) <= 2
    assert seen == order and sorted(calls) == sorted(order)
    assert p._pool._shutdown


def test_prefetch_reports_a_loader_error_at_its_unit_and_stops() -> None:
    def make(i: int) -> int:
        if i == 3:
            raise ValueError("bad partition 3")
        return i

    got = []
    with pytest.raises(ValueError, match="bad partition 3"):
        for i, _ in trie_trainer.Prefetch(make, list(range(8)), workers=2, ahead=4):
            got.append(i)
    assert got == [0, 1, 2]


def test_rehearse_update_leaves_the_state_alone(tmp_path: Path) -> None:
    """The device warm-up's update runs on copies: parameters, slots and step count stay."""
    from agpt.backend import get_backend
    from agpt.model.config import preset
    from agpt.model.params import init_params
    from agpt.store.checkpoint import Checkpoint
    from agpt.train.session import Session

    cfg = preset("micro", 5, 4)
    p0 = init_params(cfg, np.random.default_rng(0))
    ck = Checkpoint(cfg, p0, {"v": np.full_like(p0, 0.5)}, {}, {})
    s = Session(cfg, get_backend("cpu", "float32"), ck, str(tmp_path / "c"),
                OptimConfig("rmsprop", lr=0.1), 10, 0.1)
    g = np.ones_like(s.params)
    s.rehearse_update(g, 1.0)
    assert np.array_equal(s.params, p0.astype(np.float32)) and not g.any()
    assert np.all(s.opt.slots["v"] == 0.5) and s.opt.t == 0 and s.pos.update == 0
