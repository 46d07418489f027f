"""User-facing errors: the CLI prints their message (which says what to do) and exits 2."""


class HistoseekError(Exception):
    """An error caused by input or environment, with a message a person can act on."""
