"""The one error type every stage raises for bad input: its message is one line naming the problem and the fix."""


class StrataError(Exception):
    """User-facing error. The CLI prints `strata: error: <message>` and exits with status 2."""
