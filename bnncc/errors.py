"""The one exception type users see: a message that names the file or node and the problem."""

__all__ = ["BnnccError"]


class BnnccError(Exception):
    """A problem with the user's input or environment.

    The CLI prints ``str(error)`` as one line and exits with code 2; no traceback.
    Messages name the file or node and say what is wrong, e.g.
    ``"model.onnx: node 'conv1' (Conv): dynamic spatial size"``.
    """
