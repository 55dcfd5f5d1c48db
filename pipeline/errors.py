"""User-facing errors: each becomes one line on stderr and exit status 2, never a traceback."""

__all__ = ["UserError", "ConfigError", "DataError", "ArtifactError", "SourceError"]


class UserError(Exception):
    """Something the user can fix (a config, a path, a file); the message says how."""


class ConfigError(UserError, ValueError):
    """A config file or command-line override is invalid."""


class DataError(UserError):
    """A data set is missing or malformed."""


class ArtifactError(UserError):
    """A model artifact is missing, corrupt or does not match its partner."""


class SourceError(UserError):
    """A frame source (camera, video, stream, image folder, replay) cannot be opened or read."""
