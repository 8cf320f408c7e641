"""Small corpus and trie stores built in-process for the tests."""

from __future__ import annotations

from pathlib import Path

from agpt.ingest import ingest
from pipelines.build import BuildConfig, build_trie


def make_corpus(tmp: Path, texts: list[str], documents: bool = False, holdout: float = 0.0) -> str:
    files = []
    for i, t in enumerate(texts):
        f = tmp / f"doc{i:03d}.txt"
        f.write_text(t, encoding="utf-8")
        files.append(str(f))
    out = str(tmp / "corpus.zarr")
    ingest(files, out, holdout=holdout, documents=documents, force=True)
    return out


def make_trie(tmp: Path, texts: list[str], D: int, partition: str = "unigram",
              documents: bool = False, holdout: float = 0.0, **kw) -> str:
    """A radix trie store of `texts` (one corpus per tmp directory)."""
    corpus = make_corpus(tmp, texts, documents, holdout)
    out = str(tmp / f"trie-{partition}-{D}.zarr")
    build_trie(corpus, out, "radix", BuildConfig(max_depth=D, partition=partition, progress=False,
                                                 workers=1, **kw))
    return out
