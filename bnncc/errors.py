"""The one exception type users see: a message that names the file or node and the problem."""

__all__ = ["BnnccError", "first_line"]


class BnnccError(Exception):
    """A problem with the user's input or environment.

    The CLI prints ``str(error)`` as one line and exits with code 2; no traceback.
    Messages name the file or node and say what is wrong, e.g.
    ``"model.onnx: node 'conv1' (Conv): dynamic spatial size"``.
    """


def first_line(error: Exception) -> str:
    """The first line of ``error``'s message for a one-line error, or its type's name when the
    message is empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
