"""`agpt demo` (the README's first command) end to end, at small settings."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path: Path, run_cli) -> None:
    wd = tmp_path / "demo"
    code, out, err = run_cli("demo", "--workdir", wd, "-D", "3", "--train-kb", "8",
                             "--train-depth", "3", "--epochs", "1")
    assert code == 0, err[-2000:]
    for stage in ("ingest", "build-radix", "build-index", "verify", "profile", "train",
                  "perplexity", "sample", "plot"):
        assert f"$ agpt {stage}" in out
    assert "PPL" in out and (wd / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (wd / "model.ckpt").is_dir() and "Traceback" not in err
