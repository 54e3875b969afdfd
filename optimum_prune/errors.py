"""The error of bad input: what the user asked for cannot work, and the message says what to change. Standard
library only, importable from every layer; the CLI exits 2 on it (as on a bad flag), 1 on any other failure."""

from __future__ import annotations


class InputError(ValueError):
    """A refusal of the user's input or of a combination of settings, raised before the work it would spoil."""
