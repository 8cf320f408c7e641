"""`agpt init`, `agpt import-seed-model`, `agpt export-seed-model`: checkpoints (SPEC §7)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import click

from agpt.cli import cli
from agpt.errors import AgptError, StoreFormatError

DTYPES = ("float32", "float64")


@dataclass
class StoreVocab:
    """What a checkpoint needs from a corpus or trie store."""

    tokenizer: dict[str, Any]
    max_depth: int | None     # None for a corpus store
    corpus_sha256: str
    kind: str


def store_vocab(url: str) -> StoreVocab:
    """The vocabulary (and trie depth) of a trie store or a corpus store at `url`."""
    from agpt.store.checkpoint import CHECKPOINT_KIND
    from agpt.store.corpus import open_corpus
    from agpt.store.format import TRIE_KIND, open_root
    from agpt.store.trie import open_trie

    meta = open_root(url, "r").attrs.get("agpt")
    kind = meta.get("format") if isinstance(meta, dict) else None
    if kind == CHECKPOINT_KIND:
        raise StoreFormatError(f"{url} is a checkpoint: STORE must be a corpus store (agpt ingest) "
                               "or a trie store (agpt build-radix)")
    if kind == TRIE_KIND:
        trie = open_trie(url)
        return StoreVocab(trie.corpus.tokenizer.to_meta(), trie.max_depth,
                          trie.corpus.corpus_sha256, "trie")
    corpus = open_corpus(url)  # also the canonical error for anything else
    return StoreVocab(corpus.tokenizer.to_meta(), None, corpus.corpus_sha256, "corpus")


_OUT = click.option("-o", "--out", required=True, metavar="CKPT",
                    help="Checkpoint to write: a directory path or an fsspec URL.")
_FORCE = click.option("--force", is_flag=True, help="Overwrite an existing checkpoint at --out.")


def _refuse_existing(url: str, force: bool) -> None:
    """Fail before any work when --out is taken (save_checkpoint checks again when writing)."""
    from agpt.store.checkpoint import check_save_target

    check_save_target(url, overwrite=force)


@cli.command("init")
@click.argument("store", metavar="STORE")
@_OUT
@click.option("--preset", type=click.Choice(["micro", "small", "base", "large"]), default="micro",
              show_default=True, help="Model shape; micro is the seed's µGPT.")
@click.option("--d-model", type=int, metavar="N", help="Override the preset's width.")
@click.option("--n-heads", type=int, metavar="N", help="Override the preset's head count.")
@click.option("--n-layers", type=int, metavar="N", help="Override the preset's depth.")
@click.option("--d-ff", type=int, metavar="N", help="Override the preset's FFN width.")
@click.option("--context", type=int, metavar="N",
              help="Longest context the model is meant for  [default: the trie's max depth, or 32 "
                   "for a corpus store].")
@click.option("--seed", type=int, default=0, show_default=True, help="Initialisation RNG seed.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True,
              help="Parameter dtype (float64 for exact gradient checks).")
@_FORCE
def init_cmd(store: str, out: str, preset: str, d_model: int | None, n_heads: int | None,
             n_layers: int | None, d_ff: int | None, context: int | None, seed: int, dtype: str,
             force: bool) -> None:
    """Write a randomly initialised checkpoint for the vocabulary of STORE.

    STORE is a trie store or a corpus store; the checkpoint records its vocabulary, so training
    or evaluating it on a corpus with another vocabulary is refused. Init follows SPEC §7:
    linear weights N(0, 2/d_in), embedding N(0, 1/d_model), biases 0, LayerNorm γ=1, β=0.

    \b
    Example:
      agpt init tiny.trie -o tiny.ckpt                  # micro, context = the trie's depth
      agpt init tiny.zarr -o big.ckpt --preset small --context 64 --seed 1
    """
    import numpy as np

    from agpt.model.config import preset as make_preset
    from agpt.model.params import init_params
    from agpt.store.checkpoint import Checkpoint, describe, save_checkpoint

    _refuse_existing(out, force)
    sv = store_vocab(store)
    ctx = context if context is not None else (sv.max_depth or 32)
    cfg = make_preset(preset, sv.tokenizer["vocab_size"], ctx)
    over = {k: v for k, v in (("d_model", d_model), ("n_heads", n_heads), ("n_layers", n_layers),
                              ("d_ff", d_ff)) if v is not None}
    if over:
        cfg = replace(cfg, **over)  # re-runs the config's validation
    params = init_params(cfg, np.random.default_rng(seed), dtype=np.dtype(dtype))
    state = {"init": {"preset": preset, "seed": seed, "dtype": dtype, "store": store,
                      "corpus_sha256": sv.corpus_sha256}}
    ck = Checkpoint(cfg, params, {}, sv.tokenizer, state)
    save_checkpoint(out, ck, overwrite=force)
    click.echo(f"Wrote {out}: {preset} model, {describe(ck)}, seed {seed}; vocabulary of "
               f"{cfg.vocab_size} {sv.tokenizer['tokenizer']} symbols from {sv.kind} store {store}.")


@cli.command("import-seed-model")
@click.argument("file", metavar="FILE.model")
@click.option("--store", required=True, metavar="STORE",
              help="Corpus or trie store whose vocabulary the model was trained with.")
@_OUT
@_FORCE
def import_seed_model_cmd(file: str, store: str, out: str, force: bool) -> None:
    """Convert a seed `.model` file into a checkpoint (no optimizer state).

    The file records only its vocabulary size, so the vocabulary itself comes from STORE: it
    must be the corpus the seed model was trained on (the seed's char vocabulary is the sorted
    distinct characters, as `agpt ingest --tokenizer char` makes). A size mismatch is refused.

    \b
    Example:
      agpt import-seed-model shakespeare.model --store tiny.zarr -o seed.ckpt
    """
    from agpt.model.seed_format import read_seed_model
    from agpt.store.checkpoint import Checkpoint, describe, save_checkpoint

    _refuse_existing(out, force)
    cfg, params = read_seed_model(file)
    sv = store_vocab(store)
    vs = int(sv.tokenizer["vocab_size"])
    if cfg.vocab_size != vs:
        raise AgptError(f"{file} has a vocabulary of {cfg.vocab_size} symbols but store {store} "
                        f"has {vs}: import it with --store set to the corpus it was trained on")
    ck = Checkpoint(cfg, params, {}, sv.tokenizer,
                    {"imported_from": os.path.abspath(file), "store": store,
                     "corpus_sha256": sv.corpus_sha256})
    save_checkpoint(out, ck, overwrite=force)
    click.echo(f"Imported {file} into {out}: {describe(ck)}.")


@cli.command("export-seed-model")
@click.argument("ckpt", metavar="CKPT")
@click.option("-o", "--out", required=True, metavar="FILE.model", help="Seed .model file to write.")
@click.option("--force", is_flag=True, help="Overwrite an existing file at --out.")
def export_seed_model_cmd(ckpt: str, out: str, force: bool) -> None:
    """Write the weights of checkpoint CKPT as a seed `.model` file (float32).

    The seed's format holds no vocabulary, optimizer state or RoPE/LayerNorm constants; a
    model whose rope_base or ln_eps differ from the seed's (10000, 1e-5) is refused.

    \b
    Example:
      agpt export-seed-model run.ckpt -o run.model
    """
    from agpt.model.config import ModelConfig
    from agpt.model.seed_format import write_seed_model
    from agpt.store.checkpoint import load_checkpoint

    if os.path.exists(out) and not force:
        raise AgptError(f"{out} already exists: pass --force to overwrite it, or choose another -o")
    if os.path.isdir(out):
        raise AgptError(f"{out} is a directory: give a file path for the .model file")
    ck = load_checkpoint(ckpt)
    ref = ModelConfig(ck.config.vocab_size)
    if (ck.config.rope_base, ck.config.ln_eps) != (ref.rope_base, ref.ln_eps):
        raise AgptError(f"{ckpt} uses rope_base {ck.config.rope_base}, ln_eps {ck.config.ln_eps}; "
                        f"the seed's format assumes {ref.rope_base}, {ref.ln_eps}: cannot export")
    write_seed_model(out, ck.config, ck.params)
    click.echo(f"Exported {ckpt} to {out}: {ck.params.size:,} parameters as float32 "
               f"({os.path.getsize(out):,} bytes).")
