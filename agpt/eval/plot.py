"""Loss and perplexity curves from trainer metrics files (`agpt plot`, SPEC §8).

A metrics file is JSON lines; each line has "event" ("step", "epoch" or "eval"), "step",
"epoch", "loss" (mean NLL per predicted token) and "lr"; "eval" lines add "heldout_nll" and/or
"heldout_ppl". Lines of other events are ignored (later trainers may add some).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from agpt.errors import AgptError


@dataclass
class Curves:
    """What one metrics file contributes to the plot."""

    name: str
    train: list[tuple[float, float]] = field(default_factory=list)    # (step, loss)
    epochs: list[tuple[float, float]] = field(default_factory=list)   # (step, loss)
    heldout: list[tuple[float, float]] = field(default_factory=list)  # (step, ppl)


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def read_metrics(path: str | Path) -> Curves:
    """Parse one metrics file; a malformed line is an AgptError naming the file and line."""
    path = Path(path)
    c = Curves(path.name)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as e:
        raise AgptError(f"{path}: no such metrics file") from e
    except UnicodeDecodeError as e:
        raise AgptError(f"{path}: not a UTF-8 JSON-lines metrics file") from e
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{no}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise AgptError(f"{where}: malformed JSON ({e.msg}); metrics files hold one JSON "
                            "object per line") from e
        if not isinstance(d, dict) or not isinstance(d.get("event"), str):
            raise AgptError(f"{where}: expected a JSON object with an \"event\" field")
        ev = d["event"]
        if ev not in ("step", "epoch", "eval"):
            continue
        if not _number(d.get("step")):
            raise AgptError(f"{where}: {ev} line without a numeric \"step\"")
        step = float(d["step"])
        if ev == "eval":
            if _number(d.get("heldout_ppl")):
                c.heldout.append((step, float(d["heldout_ppl"])))
            elif _number(d.get("heldout_nll")):
                c.heldout.append((step, math.exp(min(float(d["heldout_nll"]), 700.0))))
            else:
                raise AgptError(f"{where}: eval line without numeric \"heldout_ppl\" or "
                                "\"heldout_nll\"")
            continue
        if not _number(d.get("loss")):
            raise AgptError(f"{where}: {ev} line without a numeric \"loss\"")
        (c.train if ev == "step" else c.epochs).append((step, float(d["loss"])))
    if not (c.train or c.epochs or c.heldout):
        raise AgptError(f"{path}: no step, epoch or eval lines to plot")
    return c


def plot_metrics(paths: list[str | Path], out: str | Path, title: str | None = None) -> Path:
    """Draw training loss vs step and PPL (log scale, with held-out points) into a PNG."""
    curves = [read_metrics(p) for p in paths]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(12, 4.5))
    try:
        for i, c in enumerate(curves):
            color = f"C{i % 10}"
            pts = c.train or c.epochs      # per-step lines if the file has them, else epochs
            if pts:
                s, loss = zip(*pts, strict=True)
                ax_loss.plot(s, loss, color=color, lw=1, label=c.name)
                ax_ppl.plot(s, [math.exp(min(v, 700.0)) for v in loss], color=color, lw=1,
                            label=f"{c.name} (train)")
            if c.heldout:
                s, ppl = zip(*c.heldout, strict=True)
                ax_ppl.plot(s, ppl, "o--", color=color, ms=5, lw=0.8,
                            label=f"{c.name} (held-out)")
        ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="training loss")
        ax_ppl.set(xlabel="step", ylabel="perplexity", title="perplexity", yscale="log")
        for ax in (ax_loss, ax_ppl):
            ax.grid(True, alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        out = Path(out)
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        try:
            fig.savefig(tmp, format="png", dpi=110)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        plt.close(fig)
    return out
