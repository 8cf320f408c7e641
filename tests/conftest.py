"""Shared fixtures: the reference corpus, an in-process `agpt` runner, the GPU backend."""

from __future__ import annotations

import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

RunCli = Callable[..., tuple[int, str, str]]


@pytest.fixture(scope="session")
def tiny_shakespeare() -> Path:
    """tinyshakespeare.txt from the shared data folder (never copied into the repo)."""
    path = TINY_SHAKESPEARE.resolve()
    if not path.is_file():
        pytest.skip(f"reference corpus {path} is absent")
    return path


@pytest.fixture(scope="session")
def gpu():
    """The CuPy backend (fp32, TF32 off); skips without CuPy or a CUDA device."""
    pytest.importorskip("cupy")
    from agpt.gpu.backend import CupyBackend, gpu_available
    if not gpu_available():
        pytest.skip("no CUDA device")
    return CupyBackend("float32")


def poison() -> None:
    """Fill freed GPU pool memory with NaN, so a kernel output element left unwritten shows up."""
    import cupy as cp
    a = cp.full(64 << 20, cp.nan, dtype=cp.float32)
    del a


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> RunCli:
    """run_cli(*args, subprocess=False) -> (exit_code, stdout, stderr) of `agpt args...`.

    In-process by default (fast): calls `agpt.cli.main` exactly as the console script does.
    An exception escaping main is printed as a traceback on stderr with exit code 1, as a real
    process would, so tests can assert that user errors never produce one.
    """
    from agpt.cli import main

    def run(*args: object, subprocess: bool = False) -> tuple[int, str, str]:
        argv = [str(a) for a in args]
        if subprocess:
            return _run_process(argv)
        capsys.readouterr()
        code = 0
        try:
            main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # mirror the interpreter's top level
            traceback.print_exc()
            code = 1
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _run_process(argv: list[str]) -> tuple[int, str, str]:
    p = subprocess.run([sys.executable, "-m", "agpt", *argv], capture_output=True, text=True,
                       cwd=REPO, timeout=600)
    return p.returncode, p.stdout, p.stderr
