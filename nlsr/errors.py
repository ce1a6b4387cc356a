"""One base class for every user-facing error: the CLI prints its message (naming the field or file) and exits 2."""


class NLSRError(ValueError):
    pass
