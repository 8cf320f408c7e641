"""`agpt` subcommands of the train stage (registered on import by agpt.cli)."""

from __future__ import annotations

from agpt.cli import cli  # noqa: F401
