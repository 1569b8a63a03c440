"""dyntie's own error type: a user-caused failure, shown as one line that names the fix."""


class DyntieError(Exception):
    """A failure the user can fix. The CLI prints its message (one sentence) and exits with ``exit_code``."""

    exit_code = 1

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(DyntieError):
    """Bad command-line input (unknown name, malformed --set, ...): exit code 2, like Click's usage errors."""

    exit_code = 2
