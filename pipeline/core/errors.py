"""Exception types the CLI turns into one-line error messages (no traceback)."""


class PipelineError(Exception):
    """A user-facing error: the message names the file or parameter and what to do."""


class ParamsError(PipelineError):
    """An invalid ``params.yaml`` value, raised before a stage does any work."""
