"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class DriveKDError(Exception):
    """An error caused by the user's input (file, config, arguments), not by a bug."""


class DataError(DriveKDError):
    """Malformed or inconsistent data: the message names the file, the item and what is wrong."""
