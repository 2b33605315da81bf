"""The one exception type users see."""


class IdeoquantError(Exception):
    """A problem with the user's input or environment.

    The message is always one line: control characters that came from the input (a tensor name with a newline in a
    hostile file) are shown escaped. The CLI prints it and exits with code 2; nothing half-written is left behind.
    """

    def __init__(self, message: str = "") -> None:
        text = str(message)
        if any(c < " " or c == "\x7f" for c in text):
            text = "".join(c if c >= " " and c != "\x7f" else repr(c)[1:-1] for c in text)
        super().__init__(text)


def damaged_tensor(name: str) -> IdeoquantError:
    """The error for a NaN or Inf found in a source tensor, whichever pass finds it."""
    return IdeoquantError(f"tensor {name} contains NaN or Inf; the source checkpoint is damaged")
