"""Exceptions for mistakes a user can fix; the CLI prints their message without a traceback."""


class LtbenchError(Exception):
    """Base of every error caused by user input (config, data, plugin names)."""


class ConfigError(LtbenchError, ValueError):
    """A config key, value or suite file is wrong."""


class PluginError(LtbenchError, LookupError):
    """A plugin name is unknown, registered twice, or breaks its contract."""


class DataError(LtbenchError):
    """Data files are missing, malformed or differ from the canonical release."""


class TrainingError(LtbenchError, RuntimeError):
    """Training cannot go on (for example, the loss became NaN)."""
