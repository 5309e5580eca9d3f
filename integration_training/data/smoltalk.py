"""HuggingFaceTB/smol-smoltalk: rows carry a `messages` list (system turns allowed); plain chat data."""

from __future__ import annotations

from integration_training.data.messages import to_example

NAME = "HuggingFaceTB/smol-smoltalk"

__all__ = ["NAME", "to_example"]
