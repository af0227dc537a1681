"""Errors raised while locating and loading a model."""

from __future__ import annotations


class ModelLoadError(ValueError):
    """A model path/file/config is unusable; message names the path and what is wrong."""


class UnsupportedModelError(ModelLoadError):
    """Architecture/rope type/feature we refuse to run."""
