"""The cyclic garbage collector's pauses in `agpt train`: runs the command in this process
with every collection timed and prints, at each epoch's record, one JSON line: the epoch's
seconds and I/O wait, how many objects were frozen (the trainer freezes those alive once its
epochs begin: agpt.train.trie_trainer), and the collections since the previous epoch's
record (which include that epoch's checkpoint write): each full (generation-2) pass with its
start in seconds from this program's start and its milliseconds, and the younger passes'
count and total milliseconds. `--no-freeze` makes gc.freeze a no-op: the trainer as it was.

    python bench/gc_pauses.py [--no-freeze] train STORE -o OUT --epochs 3 --device cuda ...
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agpt.cli import main  # noqa: E402
from agpt.train.session import Session  # noqa: E402

_passes: list[tuple[int, float, float]] = []     # (generation, start s, ms)
_began = [0.0]


def _timed(phase: str, info: dict) -> None:
    now = time.perf_counter()
    if phase == "start":
        _began[0] = now
    else:
        _passes.append((info["generation"], _began[0] - T0, (now - _began[0]) * 1e3))


def _reporting(log):
    seen = [0]

    def report(self: Session, event: str, **fields: object) -> None:
        log(self, event, **fields)
        if event != "epoch":
            return
        new, seen[0] = _passes[seen[0]:], len(_passes)
        young = [ms for g, _, ms in new if g < 2]
        print(json.dumps({"event": "gc", "epoch": self.pos.epoch, "seconds": fields["seconds"],
                          "io_wait_s": fields["io_wait_s"], "frozen": gc.get_freeze_count(),
                          "full_passes": [[round(t, 3), round(ms, 1)]
                                          for g, t, ms in new if g == 2],
                          "young_passes": len(young), "young_ms": round(sum(young), 1)}),
              flush=True)
    return report


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--no-freeze"]:
        args = args[1:]
        gc.freeze = lambda: None
    gc.callbacks.append(_timed)
    Session.log = _reporting(Session.log)
    main(args)
