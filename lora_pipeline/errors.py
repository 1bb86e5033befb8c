"""Errors a user can act on. The CLI prints them as one line; everything else is a bug."""

from __future__ import annotations


class LoraPipelineError(Exception):
    """Base class for errors caused by the user's input, not by the pipeline's code."""


class ConfigError(LoraPipelineError):
    """A model config file, key or override is invalid."""


class DataError(LoraPipelineError):
    """The dataset cannot be read or does not match its declared format."""


class ModelError(LoraPipelineError):
    """The base model cannot be resolved or loaded."""


class ModelRefused(ModelError):
    """The base model can be loaded, but only by doing what the config does not allow (its own code, pickles)."""


class PublishError(LoraPipelineError):
    """A model cannot be published: no promoted champion, no Hub token, or the Hub refused it."""
