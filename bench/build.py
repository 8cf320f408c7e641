"""Build benchmark: time `agpt build-radix` / `build-index` against the seed's figures (SPEC §9).

Prints figures, asserts nothing (this is not a test). Each measured command runs in a fresh
output directory; wall time is the whole command (interpreter start and imports included, as a
user sees it) and memory is the peak of the summed RSS of the command and all its descendants
(Dask workers included; see bench/_measure.py). MB = 10^6 bytes.

    python bench/build.py [--repeats 3] [--cases ts32,ts16,ts32-index,markov100]
                          [--markov-mb 100] [--workdir /tmp/agpt-bench] [--keep] [--json PATH]

Cases:
  ts32, ts16     build-radix --max-depth 32 / 16 on tinyshakespeare (ingested once, --holdout 0)
  ts32-index     build-index --max-depth 32 on the same corpus
  markov100      a >= 100 MB order-6 Markov corpus (bench/markov.py, trained on `agpt
                 demo-corpus` or tinyshakespeare, cached in the workdir), ingested then built
                 with build-radix --max-depth 32 --partition auto --memory-limit 1GB

Exit code 1 if any case failed; a case whose data is absent is skipped, not failed.
"""

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path
from types import ModuleType

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TINYSHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def _load(name: str) -> ModuleType:
    """bench/ is not a package: load a sibling module from its file."""
    spec = spec_from_file_location(name, HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


_measure = _load("_measure")
MB = _measure.MB


@dataclass(frozen=True)
class TsCase:
    """A tinyshakespeare build case and the seed's figure for it (SPEC §9, same 2-core box)."""

    command: str
    depth: int
    seed_wall_s: float
    seed_rss_mb: float
    target_wall_s: float | None = None


TS_CASES = {
    "ts32": TsCase("build-radix", 32, 6.7, 181, target_wall_s=2.2),
    "ts16": TsCase("build-radix", 16, 2.8, 70),
    "ts32-index": TsCase("build-index", 32, 43.7, 716),
}
ALL_CASES = [*TS_CASES, "markov100"]
MARKOV_TARGET_MBPS = 2.0
MARKOV_SEED_MBPS = 0.17
MARKOV_MEMORY_LIMIT = "1GB"
MARKOV_LIMIT_MB = 1000.0  # "1GB" as Dask parses it: 10^9 bytes


@dataclass
class Row:
    """One line of the result table (a case, or one step of the markov case)."""

    case: str
    command: str
    status: str = "ok"  # ok | FAILED | skipped
    runs: list[dict] = field(default_factory=list)
    text_mb: float | None = None
    store_mb: float | None = None
    seed: str = ""
    target: str = ""
    note: str = ""

    def walls(self) -> list[float]:
        return [r["wall_s"] for r in self.runs]

    def peak_mb(self) -> float:
        return max((r["peak_rss_mb"] for r in self.runs), default=float("nan"))

    def mbps(self) -> float:
        w = _measure.median(self.walls())
        return self.text_mb / w if self.text_mb and w == w and w > 0 else float("nan")


def du_mb(path: Path) -> float:
    """Disk usage of a file or directory tree (what `du` reports), in MB."""
    if not path.exists():
        return float("nan")
    if path.is_file():
        return path.stat().st_blocks * 512 / MB
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total / MB


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count() or 0
    commit = "unknown"
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": nproc,
        "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "cpu": cpu,
        "python": platform.python_version(),
        "commit": commit,
    }


class Bench:
    """Runs the cases, printing as it goes, and collects the rows."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.agpt = shlex.split(args.agpt) if args.agpt else [sys.executable, "-m", "agpt"]
        self.build_args = shlex.split(args.build_args or "")
        self.work = Path(args.workdir)
        self.rows: list[Row] = []

    def run(self, label: str, cmd: list, row: Row | None = None) -> dict:
        """Measure one command; on failure print its stderr tail and mark row FAILED."""
        cmd = [str(c) for c in cmd]
        print(f"  $ {shlex.join(cmd)}", flush=True)
        r = _measure.measure(cmd, timeout_s=self.args.timeout)
        if r["returncode"] == 0:
            print(
                f"    {label}: {r['wall_s']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB"
                f" ({r['max_procs']} process{'es' if r['max_procs'] != 1 else ''})",
                flush=True,
            )
        else:
            why = "timed out" if r["timed_out"] else f"exit code {r['returncode']}"
            tail = "\n".join(r["stderr_tail"].strip().splitlines()[-15:])
            print(f"    {label}: FAILED ({why}); stderr tail:", flush=True)
            print("      " + tail.replace("\n", "\n      "), flush=True)
            if row is not None:
                row.status = "FAILED"
                row.note = f"{why}: {_last_line(r['stderr_tail'])}"
        return r

    # -- tinyshakespeare -------------------------------------------------------------------

    def tinyshakespeare(self, cases: list[str]) -> None:
        ts = Path(self.args.tinyshakespeare)
        if not ts.is_file():
            print(f"\n[ts] {ts} not found: skipping {', '.join(cases)}")
            for c in cases:
                case = TS_CASES[c]
                self.rows.append(
                    Row(
                        c,
                        f"{case.command} --max-depth {case.depth}",
                        status="skipped",
                        seed=f"{case.seed_wall_s} s / {case.seed_rss_mb:.0f} MB",
                        target=_ts_target(case),
                        note="no data",
                    )
                )
            return
        text_mb = ts.stat().st_size / MB
        print(f"\n[ts] ingest {ts} ({text_mb:.2f} MB), --holdout 0", flush=True)
        base = fresh_dir(self.work / "ts")
        corpus = base / "corpus.zarr"
        ingest = Row("ts-ingest", "ingest", text_mb=text_mb)
        r = self.run(
            "ingest",
            [*self.agpt, "ingest", ts, "-o", corpus, "--holdout", "0", "--tokenizer", "char"],
            ingest,
        )
        ingest.runs.append(r)
        ingest.store_mb = du_mb(corpus)
        self.rows.append(ingest)
        for name in cases:
            case = TS_CASES[name]
            row = Row(
                name,
                f"{case.command} --max-depth {case.depth}",
                text_mb=text_mb,
                seed=f"{case.seed_wall_s} s / {case.seed_rss_mb:.0f} MB",
                target=_ts_target(case),
            )
            self.rows.append(row)
            print(f"\n[{name}] {row.command} x{self.args.repeats}", flush=True)
            if ingest.status != "ok":
                row.status, row.note = "FAILED", "ingest failed"
                continue
            for rep in range(self.args.repeats):
                out = fresh_dir(self.work / name / f"rep{rep}")
                trie = out / "trie.zarr"
                cmd = [
                    *self.agpt,
                    case.command,
                    corpus,
                    "-o",
                    trie,
                    "--max-depth",
                    case.depth,
                    *self.build_args,
                ]
                r = self.run(f"run {rep + 1}/{self.args.repeats}", cmd, row)
                if r["returncode"] != 0:
                    break
                row.runs.append(r)
                row.store_mb = du_mb(trie)
                if not self.args.keep:
                    shutil.rmtree(out, ignore_errors=True)
            if row.status == "ok" and row.runs:
                med = _measure.median(row.walls())
                row.note = f"{case.seed_wall_s / med:.2f}x the seed's speed"
                if case.target_wall_s is not None:
                    met = "met" if med <= case.target_wall_s else "MISSED"
                    row.target += f": {met}"
        if not self.args.keep:
            shutil.rmtree(base, ignore_errors=True)

    # -- markov100 -------------------------------------------------------------------------

    def markov_source(self) -> Path | None:
        """The demo corpus if `agpt demo-corpus` works, else tinyshakespeare, else None."""
        demo = self.work / "markov-cache" / "demo-corpus.txt"
        demo.parent.mkdir(parents=True, exist_ok=True)
        print("  training text: trying `agpt demo-corpus`", flush=True)
        r = self.run("demo-corpus", [*self.agpt, "demo-corpus", demo, "--force"])
        if r["returncode"] == 0 and demo.is_file() and demo.stat().st_size > 0:
            return demo
        ts = Path(self.args.tinyshakespeare)
        if ts.is_file():
            print(f"  training text: falling back to {ts}", flush=True)
            return ts
        return None

    def markov_corpus(self, src: Path) -> Path | None:
        """Generate (or reuse) the Markov corpus, cached by training text, order, seed, size."""
        digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
        mb = self.args.markov_mb
        name = (
            f"markov-{src.stem}-{digest}-o{self.args.markov_order}-s{self.args.seed}-{mb:g}MB.txt"
        )
        path = self.work / "markov-cache" / name
        if path.is_file():
            print(f"  corpus: cached {path}", flush=True)
            return path
        cmd = [
            sys.executable,
            HERE / "markov.py",
            "--train",
            src,
            "--order",
            self.args.markov_order,
            "--size-mb",
            f"{mb:g}",
            "--seed",
            self.args.seed,
            "-o",
            path,
        ]
        r = self.run("generate", cmd)
        if r["returncode"] != 0:
            return None
        print(f"    {r['stderr_tail'].strip().splitlines()[-1]}", flush=True)
        return path

    def markov100(self) -> None:
        print(f"\n[markov100] {self.args.markov_mb:g} MB Markov corpus", flush=True)
        build_opts = ["--max-depth", "32", "--partition", "auto"]
        build_opts += ["--memory-limit", MARKOV_MEMORY_LIMIT]
        build_cmd = shlex.join(["build-radix", *build_opts])
        rows = [
            Row("markov100", "ingest --holdout 0"),
            Row("markov100", build_cmd, target=f"peak <= {MARKOV_MEMORY_LIMIT}"),
            Row(
                "markov100",
                "end to end (ingest + build)",
                seed=f"~{MARKOV_SEED_MBPS} MB/s",
                target=f">= {MARKOV_TARGET_MBPS} MB/s",
            ),
        ]
        self.rows.extend(rows)
        src = self.markov_source()
        if src is None:
            for row in rows:
                row.status, row.note = "skipped", "no training text"
            print("  no training text (demo-corpus failed, tinyshakespeare absent): skipped")
            return
        text = self.markov_corpus(src)
        if text is None:
            for row in rows:
                row.status, row.note = "FAILED", "corpus generation failed"
            return
        text_mb = text.stat().st_size / MB
        for row in rows:
            row.text_mb = text_mb
        ingest_row, build_row, e2e_row = rows
        for rep in range(self.args.markov_repeats):
            out = fresh_dir(self.work / "markov100" / f"rep{rep}")
            corpus, trie = out / "corpus.zarr", out / "trie.zarr"
            label = f"run {rep + 1}/{self.args.markov_repeats}"
            ri = self.run(
                f"ingest {label}",
                [*self.agpt, "ingest", text, "-o", corpus, "--holdout", "0", "--tokenizer", "char"],
                ingest_row,
            )
            if ri["returncode"] != 0:
                break
            ingest_row.runs.append(ri)
            ingest_row.store_mb = du_mb(corpus)
            cmd = [*self.agpt, "build-radix", corpus, "-o", trie, *build_opts, *self.build_args]
            rb = self.run(f"build {label}", cmd, build_row)
            if rb["returncode"] != 0:
                break
            build_row.runs.append(rb)
            build_row.store_mb = du_mb(trie)
            e2e_row.runs.append(
                {
                    "wall_s": ri["wall_s"] + rb["wall_s"],
                    "peak_rss_mb": max(ri["peak_rss_mb"], rb["peak_rss_mb"]),
                }
            )
            if not self.args.keep:
                shutil.rmtree(out, ignore_errors=True)
        if ingest_row.status != "ok" or build_row.status != "ok":
            e2e_row.status, e2e_row.note = "FAILED", "a step failed"
            return
        peak = build_row.peak_mb()
        fits = "within" if peak <= MARKOV_LIMIT_MB else "OVER"
        build_row.note = f"peak {peak:.0f} MB {fits} the {MARKOV_MEMORY_LIMIT} limit"
        build_row.target += ": met" if peak <= MARKOV_LIMIT_MB else ": OVER"
        e2e_row.note = f"peak {e2e_row.peak_mb():.0f} MB {fits} the {MARKOV_MEMORY_LIMIT} limit"
        mbps = e2e_row.mbps()
        met = "met" if mbps >= MARKOV_TARGET_MBPS else "MISSED"
        e2e_row.target += f": {met}"

    # -- report ----------------------------------------------------------------------------

    def table(self, markdown: bool) -> str:
        header = [
            "case",
            "command",
            "runs",
            "wall median s",
            "wall min s",
            "peak RSS MB",
            "MB/s",
            "store MB",
            "seed",
            "target",
            "status",
            "note",
        ]
        rows = []
        for r in self.rows:
            walls = r.walls()
            rows.append(
                [
                    r.case,
                    r.command,
                    len(walls),
                    _measure.median(walls),
                    min(walls) if walls else float("nan"),
                    _round(r.peak_mb()),
                    r.mbps(),
                    r.store_mb,
                    r.seed,
                    r.target,
                    r.status,
                    r.note,
                ]
            )
        return _measure.format_table(rows, header=header, markdown=markdown)


def _ts_target(case: TsCase) -> str:
    return "" if case.target_wall_s is None else f"<= {case.target_wall_s} s"


def _no_nan(x: object) -> object:
    """NaN (no measurement) as null: strict JSON has no NaN."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_no_nan(v) for v in x]
    return x


def _round(x: float) -> int | float:
    return round(x) if x == x else x


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:160] if lines else "no stderr"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Time the agpt trie builds against the seed's figures (SPEC §9).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Cases:", 1)[1] if "Cases:" in __doc__ else None,
    )
    ap.add_argument("--repeats", type=int, default=3, help="runs per ts case (default 3)")
    ap.add_argument(
        "--cases",
        default=",".join(ALL_CASES),
        help=f"comma-separated subset of {','.join(ALL_CASES)}",
    )
    ap.add_argument(
        "--markov-mb",
        type=float,
        default=100.0,
        help="Markov corpus size in 10^6 characters (default 100)",
    )
    ap.add_argument("--markov-repeats", type=int, default=1)
    ap.add_argument("--markov-order", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0, help="Markov generator seed")
    ap.add_argument("--workdir", default="/tmp/agpt-bench")
    ap.add_argument("--keep", action="store_true", help="keep the stores built")
    ap.add_argument("--json", type=Path, help="write the raw numbers here")
    ap.add_argument("--tinyshakespeare", type=Path, default=TINYSHAKESPEARE)
    ap.add_argument(
        "--agpt", default=None, help="how to invoke agpt (default: this python -m agpt)"
    )
    ap.add_argument(
        "--build-args",
        default="",
        help="extra arguments for every build command, e.g. '--workers 2'",
    )
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per command")
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in ALL_CASES]
    if unknown or not cases:
        ap.error(
            f"unknown case(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(ALL_CASES)}"
        )
    args.case_list = list(dict.fromkeys(cases))
    if args.repeats < 1 or args.markov_repeats < 1:
        ap.error("repeats must be >= 1")
    if args.markov_mb <= 0:
        ap.error("--markov-mb must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine_info()
    bench = Bench(args)
    bench.work.mkdir(parents=True, exist_ok=True)
    print(
        f"agpt build benchmark {info['date']}: {info['nproc']} CPUs ({info['cpu']}), "
        f"{info['ram_gb']} GB RAM, Python {info['python']}, commit {info['commit']}\n"
        f"agpt = {shlex.join(bench.agpt)}; workdir {bench.work}",
        flush=True,
    )
    pre = _measure.measure([*bench.agpt, "--help"], timeout_s=120)
    if pre["returncode"] != 0:
        print(f"agpt is not runnable ({_last_line(pre['stderr_tail'])}): every case fails")
    ts_cases = [c for c in args.case_list if c in TS_CASES]
    if ts_cases:
        bench.tinyshakespeare(ts_cases)
    if "markov100" in args.case_list:
        bench.markov100()

    print("\n" + bench.table(markdown=False))
    print(
        f"\n### Build benchmark, {info['date'][:10]}\n\n"
        f"Machine: {info['nproc']} CPUs (`nproc`), {info['ram_gb']} GB RAM, {info['cpu']}; "
        f"Python {info['python']}; commit `{info['commit']}`. Wall = whole command "
        f"(median and min of the runs); peak RSS = summed over the command and all its "
        f"processes; MB = 10^6 bytes; MB/s = corpus text / median wall.\n\n"
        + bench.table(markdown=True)
    )
    if args.json:
        payload = {
            "machine": info,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "rows": [
                {
                    "case": r.case,
                    "command": r.command,
                    "status": r.status,
                    "text_mb": r.text_mb,
                    "store_mb": r.store_mb,
                    "seed": r.seed,
                    "target": r.target,
                    "note": r.note,
                    "runs": r.runs,
                    "wall": _measure.summary(r.walls()),
                    "peak_rss_mb": r.peak_mb(),
                    "mb_per_s": r.mbps(),
                }
                for r in bench.rows
            ],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_no_nan(payload), indent=2, default=str) + "\n")
        print(f"\nraw numbers: {args.json}")
    return 1 if any(r.status == "FAILED" for r in bench.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
