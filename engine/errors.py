"""Errors a user can fix. The CLI prints their message (no traceback) and exits with status 2."""


class MarionetteError(Exception):
    """Base class of errors caused by the user's input or environment, not by a bug."""


class InputError(MarionetteError, ValueError):
    """Bad input: a wrong image, audio, argument, file layout; the message names what was wrong."""


class MissingDependency(MarionetteError, RuntimeError):
    """An optional component is not installed; the message says what to install."""
