"""Errors raised by sr_core.

Every error a user can cause (a bad image, a wrong weights file, a base model of the
wrong family) is one of these, with a message that names the input and says what
was expected. Anything else escaping sr_core is a bug.
"""
from __future__ import annotations


class SRError(Exception):
    """Base class of every user-facing error of the pack."""


class InputImageError(SRError, ValueError):
    """An input image cannot be processed (unreadable, too small, NaN pixels, ...)."""


class WeightsError(SRError, ValueError):
    """A method weights file is missing, malformed, or does not fit the base model."""


class BaseModelError(SRError, ValueError):
    """The base model is not SD 2.x-base (epsilon, 512) or cannot be read."""


class SizeLimitError(SRError, ValueError):
    """The requested output is larger than what can be processed untiled."""
