"""The cronium runner package (standard library only, Python 3.8+)."""

VERSION = "0.1.0"
PROTOCOL = 2


class RunnerError(Exception):
    """A run that cannot start; ``kind`` is the result's ``error_kind``."""

    def __init__(self, kind, message):
        Exception.__init__(self, message)
        self.kind = kind
        self.message = message
