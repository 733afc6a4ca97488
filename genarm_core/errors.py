"""The project's errors: one base class, one subclass per kind of mistake. Every message names
the field or file at fault and what was expected."""


class GenarmError(Exception):
    """Base of every error this library raises on purpose."""


class ConfigError(GenarmError, ValueError):
    """A bad models.yaml (or profile dict): the message names the file, profile and field."""


class ModelLoadError(GenarmError, RuntimeError):
    """A model or adapter that cannot be loaded or does not fit the engine."""


class RequestError(GenarmError, ValueError):
    """A bad request: unknown ARM, bad weight, empty or oversized prompt, bad option."""


class DataError(GenarmError, ValueError):
    """Unreadable or malformed data: the message names the file, the line and the field."""


class TrainError(GenarmError, ValueError):
    """A bad training option: the message names the option and what was expected."""


class CliError(GenarmError):
    """A bad command line."""
