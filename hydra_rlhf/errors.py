"""Errors the entry points turn into one line for the user (``config.run_recipe``)."""


class NonFiniteError(RuntimeError):
    """Too many non-finite updates in a row; the last good checkpoint is kept."""
