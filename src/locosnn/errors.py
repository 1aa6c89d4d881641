"""User-facing errors. The CLI prints their message on one line and exits non-zero."""


class LocosnnError(Exception):
    """An error the user can fix (bad config, missing data, wrong shapes)."""

    exit_code = 2


class NonFiniteError(LocosnnError):
    """A loss or update became NaN/inf; the run stops and keeps the last good checkpoint."""

    exit_code = 3
