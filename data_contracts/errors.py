"""Errors a user can act on. Anything else that escapes a stage is a bug."""
from __future__ import annotations


class BooruflowError(Exception):
    """Base of the errors whose message tells the user what to change."""


class ConfigError(BooruflowError):
    """A config key, value or referenced path is wrong."""


class ContractError(BooruflowError):
    """An upstream artifact does not match the contract this code expects."""


class StageError(BooruflowError):
    """A stage cannot go on (e.g. no usable input left); the message says why."""
