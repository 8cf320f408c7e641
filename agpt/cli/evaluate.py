"""`agpt perplexity`, `agpt sample` and `agpt plot`: the evaluate stage (SPEC §8 "Evaluation")."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np

from agpt.cli import cli
from agpt.errors import AgptError

DEVICE = click.Choice(["auto", "cpu", "cuda"])
DTYPE = click.Choice(["float32", "float64"])


def _load(ckpt: str) -> Any:
    """The checkpoint at `ckpt` (load_checkpoint raises a one-line AgptError when it fails)."""
    from agpt.store.checkpoint import load_checkpoint

    return load_checkpoint(ckpt)


def _read_text(path: Path, tok: Any) -> np.ndarray:
    """`path` tokenized with the checkpoint's vocabulary; an unknown symbol is one-line error."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as e:
        raise AgptError(f"--text {path}: no such file") from e
    except IsADirectoryError as e:
        raise AgptError(f"--text {path}: is a directory; give a text file") from e
    try:
        return tok.encode(raw)
    except AgptError as e:
        raise AgptError(f"--text {path}: {e}") from e


@cli.command("perplexity")
@click.argument("ckpt", metavar="CKPT")
@click.option("--store", metavar="STORE",
              help="Corpus or trie store: score its held-out tokens [train_end, n_tokens).")
@click.option("--text", "text", type=click.Path(path_type=Path), metavar="FILE",
              help="Score this text file instead, tokenized with the checkpoint's vocabulary.")
@click.option("--protocol", type=click.Choice(["heldout", "seed"]), default="heldout",
              show_default=True,
              help="heldout: sliding window over the held-out tokens (or the whole --text). "
                   "seed: the seed's measurement, on the stream from its beginning (training "
                   "text for a store): positions 128 .. 128+P-1, each from the 128 tokens "
                   "before it.")
@click.option("--context", type=int, metavar="N",
              help="Tokens of context per prediction [default: the checkpoint's training "
                   "depth; 128 under --protocol seed].")
@click.option("--stride", type=int, default=1, show_default=True, metavar="S",
              help="1: every token from exactly min(N, t) preceding tokens. S > 1: windows of N "
                   "tokens advance by S and score their last S positions (faster, ~N/S times).")
@click.option("--positions", type=int, default=1000, show_default=True, metavar="P",
              help="Positions scored under --protocol seed.")
@click.option("--max-tokens", type=int, metavar="M", help="Score only the first M tokens.")
@click.option("--batch", "batch_rows", type=int, default=8192, show_default=True, metavar="ROWS",
              help="Rows (window positions) per forward pass; bounds memory.")
@click.option("--device", type=DEVICE, default="auto", show_default=True,
              help="Backend: cuda (CuPy), cpu (NumPy) or auto.")
@click.option("--dtype", type=DTYPE, default="float32", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def perplexity_cmd(ckpt: str, store: str | None, text: Path | None, protocol: str,
                   context: int | None, stride: int, positions: int, max_tokens: int | None,
                   batch_rows: int, device: str, dtype: str, as_json: bool) -> None:
    """Perplexity of checkpoint CKPT on a store's held-out tokens or on a text file.

    Reports the mean NLL (nats/token), PPL = exp(NLL), bits per token = NLL / ln 2, the tokens
    scored and the time taken. A checkpoint whose vocabulary differs from the store's is
    refused.

    \b
    Example:
      agpt perplexity run/ckpt --store tiny.trie
      agpt perplexity run/ckpt --store tiny.zarr --protocol seed --json
    """
    from agpt.backend import get_backend
    from agpt.eval.perplexity import (
        SEED_CONTEXT,
        heldout_bounds,
        open_token_store,
        perplexity,
        seed_plan,
        segments_plan,
    )
    from agpt.tokenize import Tokenizer

    if (store is None) == (text is None):
        raise AgptError("give exactly one of --store STORE or --text FILE")
    if max_tokens is not None and max_tokens < 1:
        raise AgptError(f"--max-tokens must be >= 1, got {max_tokens}")
    if protocol == "seed" and (stride != 1 or max_tokens is not None):
        raise AgptError("--stride and --max-tokens do not apply to --protocol seed: use "
                        "--positions")
    ck = _load(ckpt)
    cfg = ck.config
    tok = Tokenizer.from_meta(ck.tokenizer)
    n = context if context is not None else SEED_CONTEXT if protocol == "seed" else cfg.context
    corpus = None
    all_tokens = np.zeros(0, np.int64)
    if store is not None:
        from agpt.store.checkpoint import check_vocabulary

        corpus = open_token_store(store)
        check_vocabulary(ck.tokenizer, corpus.tokenizer.to_meta(), f"store {store}")
    elif text is not None:
        all_tokens = _read_text(text, tok)

    offset = 0
    if protocol == "seed":
        total = corpus.n_tokens if corpus is not None else len(all_tokens)
        plan = seed_plan(total, positions, n)
        where = (f"the first {n + positions:,} tokens of {store if corpus else text} (from the "
                 "stream's beginning: training text for a store, as the seed measured)")
    elif corpus is not None:
        if corpus.train_end >= corpus.n_tokens:
            raise AgptError(f"store {store} has no held-out tokens (ingested with --holdout 0): "
                            "re-ingest with --holdout, or use --text or --protocol seed")
        plan = segments_plan(heldout_bounds(corpus), n, stride)
        offset = corpus.train_end
        where = f"the held-out tokens of {store}"
    else:
        plan = segments_plan(np.array([[0, len(all_tokens)]]), n, stride)
        where = str(text)
    if max_tokens is not None:
        plan = plan.limit(max_tokens)
    if plan.n_scored == 0:
        raise AgptError(f"nothing to score in {where}: it needs at least 2 tokens")
    if corpus is not None:
        end = int((plan.start + plan.length).max()) + 1
        tokens = corpus.tokens(offset, offset + end)
    else:
        tokens = all_tokens
    be = get_backend(device, dtype)
    flat = be.asarray(ck.params)            # on the backend's device
    err = sys.stderr
    if err.isatty():   # a bar for people; nothing for pipes and logs (not even its label)
        with click.progressbar(length=plan.n_windows, label="scoring", file=err) as bar:
            res = perplexity(cfg, be, flat, tokens, plan, context=n, stride=stride,
                             protocol=protocol, source=where, batch_rows=batch_rows,
                             progress=bar.update)
    else:
        res = perplexity(cfg, be, flat, tokens, plan, context=n, stride=stride,
                         protocol=protocol, source=where, batch_rows=batch_rows)
    _report(res, be, as_json)


def _report(res: Any, be: Any, as_json: bool) -> None:
    if as_json:
        d = res.to_dict()
        d["backend"] = be.name
        d["tokens_per_second"] = res.tokens / max(res.seconds, 1e-9)
        click.echo(json.dumps(d))
        return
    rate = res.tokens / max(res.seconds, 1e-9)
    how = (f"context {res.context}" if res.protocol == "seed"
           else f"context {res.context}, stride {res.stride}")
    click.echo(f"Perplexity on {res.source}:")
    click.echo(f"  NLL {res.nll:.4f} nats/token   PPL {res.ppl:.3f}   "
               f"{res.bits_per_token:.4f} bits/token")
    click.echo(f"  {res.tokens:,} tokens scored, {how}, {res.seconds:.2f} s "
               f"({rate:,.0f} tokens/s, {be.name})")
    if res.protocol == "seed":
        click.echo("  note: the seed protocol measures on training text (in-sample), as the seed "
                   "did; it is not a held-out figure.")


@cli.command("sample")
@click.argument("ckpt", metavar="CKPT")
@click.option("--prompt", default=None, metavar="TEXT",
              help="Text to continue [default: a newline if the vocabulary has one, else its "
                   "first symbol].")
@click.option("--length", type=int, default=200, show_default=True, help="Tokens to generate.")
@click.option("--temperature", type=float, default=1.0, show_default=True,
              help="Softmax temperature; 0 = greedy.")
@click.option("--top-k", type=int, default=0, show_default=True,
              help="Draw only from the k most likely tokens (0 = all).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (deterministic).")
@click.option("--device", type=DEVICE, default="auto", show_default=True)
@click.option("--dtype", type=DTYPE, default="float32", show_default=True)
def sample_cmd(ckpt: str, prompt: str | None, length: int, temperature: float, top_k: int,
               seed: int, device: str, dtype: str) -> None:
    """Generate text from checkpoint CKPT, each token from the last config.context tokens.

    Prints the prompt followed by the generated text.

    \b
    Example:
      agpt sample run/ckpt --prompt 'ROMEO:' --length 300 --temperature 0.8 --top-k 10
    """
    from agpt.backend import get_backend
    from agpt.eval.sample import default_prompt, sample
    from agpt.tokenize import Tokenizer

    ck = _load(ckpt)
    tok = Tokenizer.from_meta(ck.tokenizer)
    if prompt is None:
        ids = default_prompt(tok)
    else:
        try:
            ids = tok.encode(prompt)
        except AgptError as e:
            raise AgptError(f"--prompt: {e}") from e
        if not len(ids):
            raise AgptError("--prompt is empty: give at least one symbol, or leave it out")
    be = get_backend(device, dtype)
    out = sample(ck.config, be, be.asarray(ck.params), ids, length, temperature, top_k, seed)
    click.echo(tok.decode(np.concatenate([np.asarray(ids, np.int64), out])))


@cli.command("plot")
@click.argument("metrics", nargs=-1, required=True, type=click.Path(path_type=Path),
                metavar="METRICS.jsonl...")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="PNG file to write.")
@click.option("--title", default=None, help="Figure title.")
def plot_cmd(metrics: tuple[Path, ...], out: Path, title: str | None) -> None:
    """Draw training loss and perplexity curves from trainer metrics files into a PNG.

    One line per file (labelled by file name): loss vs step, and PPL = exp(loss) on a log
    scale with the held-out PPL of "eval" lines as points.

    \b
    Example:
      agpt plot run/metrics.jsonl window/metrics.jsonl -o curves.png
    """
    from agpt.eval.plot import plot_metrics

    plot_metrics(list(metrics), out, title)
    click.echo(f"Wrote {out} ({len(metrics)} metrics file(s)).")
