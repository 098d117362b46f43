"""The one exception family of ken_dist: every user-facing failure is a KenError."""


class KenError(ValueError):
    """Bad input or state, with a message that names the thing and says how to fix it."""


class NonFiniteRowError(KenError):
    """A row holds NaN or infinity; `row` is its index within the rows given to the kernel.

    The kernel does not know file or tensor names; the pipeline catches this and re-raises
    with both (see `KenError` messages in ken_dist.runtime)."""

    def __init__(self, message: str, row: int):
        super().__init__(message)
        self.row = row
