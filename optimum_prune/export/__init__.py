"""Saving pruned models: metadata, masks, formats."""

from .files import atomic_directory
from .metadata import METADATA_KEY, build_metadata, read_metadata

__all__ = ["METADATA_KEY", "atomic_directory", "build_metadata", "read_metadata"]
