"""care-q's error type: every user-facing failure is a CareQError with a message naming the problem."""


class CareQError(Exception):
    """A problem with the user's input or environment, reported without a traceback by the CLI."""
