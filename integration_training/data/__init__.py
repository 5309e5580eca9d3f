"""Data: sources (hub / local files / procedural), one adapter per task, and the seeded mixture."""

from integration_training.data.mixture import Mixture, MixtureReport, build_mixture, shuffle_interleaved
from integration_training.data.sources import (
    SUPPORTED_NAMES,
    SourceCount,
    load_all,
    load_source,
    load_source_counted,
    sample_and_repeat,
    source_label,
)
from integration_training.data.types import Example, RowError, validate_messages

__all__ = [
    "SUPPORTED_NAMES",
    "Example",
    "Mixture",
    "MixtureReport",
    "RowError",
    "SourceCount",
    "build_mixture",
    "load_all",
    "load_source",
    "load_source_counted",
    "sample_and_repeat",
    "shuffle_interleaved",
    "source_label",
    "validate_messages",
]
