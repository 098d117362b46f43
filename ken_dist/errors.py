"""The one exception family of ken_dist: every user-facing failure is a KenError.

Subclasses say which kind of thing was wrong, so callers and tests can catch by kind instead of
matching message text; every message still names the file, tensor or field and the fix.
"""


class KenError(ValueError):
    """Bad input or state, with a message that names the thing and says how to fix it."""


class InputError(KenError):
    """Bad parameters or job file: sizes, k/keep, strategy, names, options, CLI arguments."""


class CheckpointError(KenError):
    """A base or fine-tune checkpoint cannot be used: missing, corrupt, mismatched, changed."""


class StoreError(KenError):
    """A subnetwork store, manifest, journal or part file cannot be used or written."""


class ClusterError(KenError):
    """Ray or the Ray Jobs API cannot do what was asked: unreachable, refused, failed workers."""


class NonFiniteRowError(KenError):
    """A row holds NaN or infinity; `row` is its index within the rows given to the kernel.

    The kernel does not know file or tensor names; the pipeline catches this and re-raises
    with both (see `KenError` messages in ken_dist.runtime)."""

    def __init__(self, message: str, row: int):
        super().__init__(message)
        self.row = row
