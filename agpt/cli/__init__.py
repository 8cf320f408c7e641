"""The `agpt` command line. Each submodule registers the subcommands of one stage of SPEC §2."""

from __future__ import annotations

import sys

import click

from agpt import __version__
from agpt.errors import AgptError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="agpt")
def cli() -> None:
    """AGPT: build a prefix trie of a corpus and train a language model on it."""


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        cli.main(args=argv, prog_name="agpt", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("agpt: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except AgptError as e:
        click.echo(f"agpt: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("agpt: interrupted; rerun the same command to resume", err=True)
        sys.exit(130)
    except OSError as e:  # disk full, permissions: the environment, not a bug
        click.echo(f"agpt: error: {e.strerror or e} ({getattr(e, 'filename', '') or 'I/O'})", err=True)
        sys.exit(2)


# Subcommands register themselves on `cli` when imported.
from agpt.cli import build, demo, evaluate, ingest, model, tools, train, verify  # noqa: E402,F401
