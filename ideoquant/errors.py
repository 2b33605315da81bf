"""The one exception type users see."""


class IdeoquantError(Exception):
    """A problem with the user's input or environment.

    The CLI prints the message as one line and exits with code 2; nothing half-written is left behind.
    """
