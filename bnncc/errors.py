"""The one exception type users see: a message that names the file or node and the problem."""

import reprlib
import unicodedata

__all__ = ["BnnccError", "first_line", "printable", "shown", "tool_said"]


class BnnccError(Exception):
    """A problem with the user's input or environment.

    The CLI prints ``str(error)`` as one line and exits with code 2; no traceback.
    Messages name the file or node and say what is wrong, e.g.
    ``"model.onnx: node 'conv1' (Conv): dynamic spatial size"``.
    """


# control characters (ESC starts a terminal's escape sequences), bidirectional and other format
# characters, and line and paragraph separators
_UNPRINTABLE = frozenset(("Cc", "Cf", "Zl", "Zp"))


def printable(text: str, keep: str = "") -> str:
    """``text`` with each character that would act on a terminal instead of showing (see
    ``_UNPRINTABLE``), but those in ``keep``, written as its Python escape: names and paths come
    from the user's files, and an ESC in a node's name cleared the screen of whoever printed its error."""
    return "".join(c.encode("unicode_escape").decode("ascii")
                   if unicodedata.category(c) in _UNPRINTABLE and c not in keep else c for c in text)


# a value as an error line shows it: a few levels deep and a few dozen characters a string or number, a few items
# a list or table (a recipe's 5 MB string was printed whole, and a table nested 5000 deep by dotted keys,
# a.a.a... = 1, ended in "unexpected RecursionError" while its repr was built)
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel = 3
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = _SHORT_REPR.maxlong = 60
_SHORT_REPR.maxlist = _SHORT_REPR.maxtuple = _SHORT_REPR.maxdict = _SHORT_REPR.maxset = 8


def shown(value: object) -> str:
    """``repr(value)`` for an error line, cut short where it is long or deep (``...``): the value may come
    from a user's file."""
    return _SHORT_REPR.repr(value)


def first_line(error: Exception) -> str:
    """The first line of ``error``'s message for a one-line error, or its type's name when the
    message is empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def tool_said(output: str, limit: int = 2000) -> str:
    """A tool's ``output`` (a compiler's or a runner's stderr, several lines) as one line for an error:
    its words joined by spaces, the last ``limit`` characters (where the cause is said). Kept as they
    were, its line breaks reached the CLI's line as "\\n" escapes."""
    return " ".join(output.split())[-limit:]
