"""Measure a command: wall time and peak memory of its whole process tree.

The builds run Dask, which may fork worker processes; the memory a build costs the machine is
the sum over all of them, so we poll the RSS of the process and every descendant (psutil) and
keep the peak of the sum. Polling can miss a spike shorter than ``poll_s``; as a floor we also
take the kernel's own max-RSS of the largest single process (``wait4`` rusage), which misses
nothing but does not sum. RSS double-counts pages that forked workers share, so the summed peak
is an upper bound on what the tree really used.

Sizes: MB = 10^6 bytes throughout the benchmarks.
"""

import os
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence

import psutil

MB = 1e6
_TAIL = 4000  # characters of stdout/stderr kept


def _tail(path: str, limit: int = _TAIL) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - limit))
        return f.read().decode("utf-8", errors="replace")


def measure(
    cmd: Sequence[str],
    env: Mapping[str, str] | None = None,
    poll_s: float = 0.02,
    timeout_s: float | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> dict:
    """Run cmd to completion; return wall time, peak summed RSS of its tree, exit code, tails.

    Keys: cmd, returncode (127 if it could not start, -signal if killed), wall_s,
    peak_rss_mb (summed over the tree, polled), peak_rss_main_mb (the process alone),
    max_single_rss_mb (kernel max-RSS of the largest process), max_procs, user_s, sys_s
    (CPU of the whole waited-for tree), timed_out, stdout_tail, stderr_tail.
    """
    cmd = [str(c) for c in cmd]
    result: dict = {
        "cmd": cmd,
        "returncode": None,
        "wall_s": 0.0,
        "peak_rss_mb": 0.0,
        "peak_rss_main_mb": 0.0,
        "max_single_rss_mb": 0.0,
        "max_procs": 0,
        "user_s": 0.0,
        "sys_s": 0.0,
        "timed_out": False,
        "stdout_tail": "",
        "stderr_tail": "",
    }
    with tempfile.TemporaryDirectory(prefix="agpt-measure-") as tmp:
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
            t0 = time.perf_counter()
            try:
                # Own session: on timeout or Ctrl-C the whole tree can be signalled at once.
                proc = subprocess.Popen(
                    cmd,
                    stdout=out_f,
                    stderr=err_f,
                    stdin=subprocess.DEVNULL,
                    env=None if env is None else dict(env),
                    cwd=cwd,
                    start_new_session=True,
                )
            except OSError as e:
                result["returncode"] = 127
                result["stderr_tail"] = f"could not start {cmd[0]!r}: {e}"
                return result
            done = threading.Event()
            waited: dict = {}

            def _wait() -> None:
                # wait4 (not Popen.wait) for an exact end time and the tree's rusage.
                _, status, usage = os.wait4(proc.pid, 0)
                waited["t"] = time.perf_counter()
                waited["status"] = status
                waited["usage"] = usage
                done.set()

            waiter = threading.Thread(target=_wait, daemon=True)
            waiter.start()
            try:
                root = psutil.Process(proc.pid)
            except psutil.Error:
                root = None
            seen: dict[int, psutil.Process] = {}
            deadline = None if timeout_s is None else t0 + timeout_s
            try:
                while True:
                    if root is not None:
                        _sample(root, seen, result)
                    if done.wait(poll_s):
                        break
                    if deadline is not None and time.perf_counter() > deadline:
                        result["timed_out"] = True
                        _kill_tree(proc.pid, seen)
                        done.wait()
                        break
            except BaseException:
                _kill_tree(proc.pid, seen)
                done.wait(5)
                raise
            waiter.join()
            proc.returncode = os.waitstatus_to_exitcode(waited["status"])
        usage = waited["usage"]
        result["returncode"] = proc.returncode
        result["wall_s"] = waited["t"] - t0
        result["max_single_rss_mb"] = usage.ru_maxrss * 1024 / MB  # Linux reports KiB
        result["peak_rss_mb"] = max(result["peak_rss_mb"], result["max_single_rss_mb"])
        result["user_s"] = usage.ru_utime
        result["sys_s"] = usage.ru_stime
        result["stdout_tail"] = _tail(out_path)
        result["stderr_tail"] = _tail(err_path)
    return result


def _sample(root: psutil.Process, seen: dict[int, psutil.Process], result: dict) -> None:
    """Add one poll of the tree's RSS to result's peaks.

    Descendants are remembered across polls, so one that is reparented (its parent exited)
    is still counted while it lives; psutil checks a remembered pid was not reused.
    """
    try:
        for child in root.children(recursive=True):
            seen.setdefault(child.pid, child)
    except psutil.Error:
        pass
    total = 0
    alive = 0
    try:
        main = root.memory_info().rss
        total += main
        alive += 1
        result["peak_rss_main_mb"] = max(result["peak_rss_main_mb"], main / MB)
    except psutil.Error:
        pass
    for pid, p in list(seen.items()):
        try:
            if not p.is_running():
                raise psutil.NoSuchProcess(pid)
            total += p.memory_info().rss
            alive += 1
        except psutil.Error:
            del seen[pid]
    result["peak_rss_mb"] = max(result["peak_rss_mb"], total / MB)
    result["max_procs"] = max(result["max_procs"], alive)


def _kill_tree(pid: int, seen: dict[int, psutil.Process]) -> None:
    """SIGKILL the session's process group and any descendant that left it."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    for p in seen.values():
        try:
            p.kill()
        except psutil.Error:
            pass


def median(xs: Iterable[float]) -> float:
    """Median; NaN for no values (a failed case still prints a row)."""
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def summary(xs: Iterable[float]) -> dict[str, float]:
    """median, min and max of repeated measurements."""
    xs = list(xs)
    if not xs:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def _cell(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if v != v:  # NaN
            return "—"
        return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def format_table(
    rows: Sequence[Sequence[object]], header: Sequence[str] | None = None, markdown: bool = False
) -> str:
    """Aligned text table (or a Markdown one); numbers right-aligned, floats to 2 places."""
    body = [[_cell(v) for v in r] for r in rows]
    head = list(header) if header is not None else None
    ncol = max([len(r) for r in body] + [len(head) if head else 0])
    body = [r + [""] * (ncol - len(r)) for r in body]
    numeric = [
        all(isinstance(r[c], int | float) or r[c] is None for r in rows if c < len(r))
        and any(c < len(r) and r[c] is not None for r in rows)
        for c in range(ncol)
    ]
    lines_src = ([head + [""] * (ncol - len(head))] if head else []) + body
    width = [max(len(r[c]) for r in lines_src) for c in range(ncol)]

    def fmt(r: list[str]) -> str:
        cells = [r[c].rjust(width[c]) if numeric[c] else r[c].ljust(width[c]) for c in range(ncol)]
        return ("| " + " | ".join(cells) + " |") if markdown else "  ".join(cells).rstrip()

    lines = []
    if head:
        lines.append(fmt(lines_src[0]))
        if markdown:
            lines.append(
                "|"
                + "|".join(
                    ("-" * (w + 1) + ":") if numeric[c] else "-" * (w + 2)
                    for c, w in enumerate(width)
                )
                + "|"
            )
        else:
            lines.append("  ".join("-" * w for w in width))
    lines.extend(fmt(r) for r in body)
    return "\n".join(lines)
