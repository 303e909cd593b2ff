"""User-facing errors: the CLI prints these as one line, without a traceback."""


class PLMError(Exception):
    """A mistake in user input (config, checkpoint, data, settings), with a clear message."""


class CheckpointError(PLMError):
    """A checkpoint directory or file that cannot be loaded as it is."""


class ConfigError(PLMError, ValueError):
    """A configuration value that cannot work."""
