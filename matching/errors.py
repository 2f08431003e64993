class MatchingError(ValueError):
    """A problem with the user's inputs; the message says what to change."""


class Cancelled(Exception):
    """Raised inside a long loop when ``should_cancel()`` returned True."""
