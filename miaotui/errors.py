"""The one exception type that user-facing mistakes raise.

Not for internal bugs: those stay ordinary exceptions with tracebacks.
"""


class MiaotuiError(ValueError):
    """A problem with the user's input (file, model, argument), worded to be shown as one line."""
