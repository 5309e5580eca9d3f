"""Generic HF chat datasets: each row has a `messages` column of {role, content} dicts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from integration_training.data.types import Example, RowError, validate_messages


def to_example(row: Mapping[str, Any], source: str, reward: str | None) -> Example:
    if "messages" not in row:
        raise RowError(f"no 'messages' column (fields present: {', '.join(sorted(map(str, row)))})")
    messages = validate_messages(row["messages"])
    reference = row.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise RowError("'reference' must be a string when present")
    return Example(messages=messages, reference=reference, reward=reward, source=source)
