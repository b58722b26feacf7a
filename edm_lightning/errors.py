"""Errors that are the user's to fix: the CLI prints their message alone, without a traceback."""

__all__ = ["ConfigError", "UserError"]


class UserError(Exception):
    """Base of every error whose message tells the user what was wrong and what to do."""


class ConfigError(UserError, ValueError):
    """A configuration value is out of range or inconsistent with another one."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """A checkpoint a config names does not exist; the message says how to produce it."""
