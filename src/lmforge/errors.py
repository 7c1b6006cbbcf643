"""User-facing errors: the CLI prints their message on one line (no traceback) and exits with `exit_code`."""


class LmforgeError(Exception):
    """A mistake the user can fix (bad config, bad input path, corrupt data). Internal invariants use assert."""

    exit_code = 2


class ConfigError(LmforgeError):
    """A config file or override that does not match the command's schema."""


class DataError(LmforgeError):
    """Input data that cannot be used: missing, empty, unreadable or malformed."""


class IntegrityError(LmforgeError):
    """A manifest check failed: a file is missing, truncated or has changed since it was written."""

    exit_code = 3
