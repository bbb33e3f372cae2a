"""Exceptions with messages meant for users (the CLI prints them without a traceback)."""


class ThinkpressError(Exception):
    """Base class: a user-facing error."""


class ConfigError(ThinkpressError):
    """Invalid configuration; raised before any work starts. The message names the key path."""


class PluginError(ThinkpressError):
    """Unknown plugin, conflicting providers, or a plugin that misbehaves."""


class ModelError(ThinkpressError):
    """A model cannot be found, fetched or verified."""


class DataError(ThinkpressError):
    """A dataset file is missing or malformed (the message names file and line)."""


class RunStoreError(ThinkpressError):
    """The run directory cannot be used (e.g. it belongs to a different config)."""


class TrainingError(ThinkpressError):
    """Training failed (e.g. non-finite loss); the last good adapter is kept."""
