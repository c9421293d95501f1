"""One exception tree for edgeml, translated to a one-line message and exit code at the CLI.

Every error says what is wrong and what to do about it. The CLI prints ``str(error)`` and
exits with ``error.exit_code``; the codes are documented in docs/cli.md.
"""
from __future__ import annotations


class EdgemlError(Exception):
    """Base class of every error edgeml raises on purpose."""

    exit_code = 1


class UsageError(EdgemlError):
    """An option or a combination of options that cannot work."""

    exit_code = 2


class InputError(EdgemlError):
    """A file that is missing, unreadable, or in a format edgeml does not read."""

    exit_code = 3


class DataError(EdgemlError):
    """Calibration or evaluation data that does not match the model."""

    exit_code = 4


class UnsupportedModelError(EdgemlError):
    """A model that uses an op or feature the target runtime cannot run."""

    exit_code = 5


class ConversionError(EdgemlError):
    """A converter or quantizer failed on a model it should have handled."""

    exit_code = 6


class KeyFileError(EdgemlError):
    """A signing or public key file that is missing or is not an Ed25519 key."""

    exit_code = 7


class VerificationError(EdgemlError):
    """An artifact whose signature, hashes or structure do not check out."""

    exit_code = 8


class AccuracyGoalNotMet(EdgemlError):
    """The artifact was written, but no candidate met the accuracy goal."""

    exit_code = 9

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of a lower-level error, for a one-line message that wraps it."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:limit]
