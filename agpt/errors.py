"""User-facing errors: the CLI prints them as one line and exits non-zero (SPEC §10)."""


class AgptError(Exception):
    """A problem with the user's input or environment; the message names it and the fix."""

    exit_code = 2


class StoreFormatError(AgptError):
    """A store that is missing, incomplete, corrupt, or of another format version."""
