"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class DriveKDError(Exception):
    """An error caused by the user's input (file, config, arguments), not by a bug.

    The message is kept to one line: a line break inside quoted data (a scene id, a question) is
    shown as `\\n`, so the error stays one line on stderr.
    """

    def __init__(self, message: str = "") -> None:
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


class DataError(DriveKDError):
    """Malformed or inconsistent data: the message names the file, the item and what is wrong."""
