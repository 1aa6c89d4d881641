"""User-facing errors. The CLI prints their message on one line and exits non-zero."""


class LocosnnError(Exception):
    """An error the user can fix (bad config, missing data, wrong shapes)."""

    exit_code = 2


class NonFiniteError(LocosnnError):
    """A loss or update became NaN/inf; the run stops and keeps the last good checkpoint."""

    exit_code = 3


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised by the command line's signal handler like Ctrl-C's KeyboardInterrupt, so that
    atomic writes clean up, worker processes are stopped and locks are released on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def interrupt_exit_code(e: BaseException) -> int:
    """128 + the signal number (130 for Ctrl-C, 143 for SIGTERM), as a shell reports a killed command."""
    return 128 + int(getattr(e, "signum", 2))
