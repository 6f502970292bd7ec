"""Errors peftlab raises on bad input.

Every error says what was wrong and what to do about it, so a user never has
to read a traceback from deep inside torch to find a typo in a config.
"""


class PeftlabError(Exception):
    """Base class for every error peftlab raises on purpose."""


class ConfigError(PeftlabError, ValueError):
    """An unknown method, an unknown key, or a value out of range."""


class TargetError(PeftlabError, ValueError):
    """A target pattern matched no module, or matched one that cannot be wrapped."""


class AdapterFormatError(PeftlabError, ValueError):
    """An adapter file is missing, truncated, corrupt, pickled, or of an unknown format."""


class IncompatibleBaseError(PeftlabError, ValueError):
    """An adapter was saved for a different base model than the one it is loaded onto."""


class StateError(PeftlabError, RuntimeError):
    """An operation that does not fit the model's current adapter state (e.g. routing while merged)."""


class TrainingError(PeftlabError, RuntimeError):
    """Training stopped on purpose, e.g. on a NaN or infinite loss."""


class DataError(PeftlabError, ValueError):
    """Training data that cannot be read or does not have the columns asked for."""
