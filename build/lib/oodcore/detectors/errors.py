"""The detectors' one error type."""


class MethodUnavailable(RuntimeError):
    """The cache lacks what this method (or this parameter setting) needs."""
