"""One exception type for everything wrong with a checkpoint: callers show its message as is."""


class GraceFormatError(ValueError):
    """A GRACE checkpoint is malformed or inconsistent. The message names the file and tensor."""
