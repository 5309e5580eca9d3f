"""The one record every data source produces, and the small helpers adapters share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    """One conversation; the last message is the assistant's reference solution (SFT target).

    An RL / eval prompt is `messages[:-1]`.
    """

    messages: tuple[dict[str, str], ...]
    reference: str | None  # what the verifier compares against ("42", "B", ...); None for chat data
    reward: str | None  # verifier key ("gsm8k" | "arc" | "arithmetic" | "spelling" | "module:function") or None
    source: str  # label of the DatasetSpec it came from, e.g. "openai/gsm8k:main/train"

    def __post_init__(self) -> None:
        assert self.messages and self.messages[-1]["role"] == "assistant", "an Example ends with an assistant turn"


class RowError(ValueError):
    """A row that does not fit the adapter's schema; the loader adds where it came from (file:line)."""


def validate_messages(raw: Any) -> tuple[dict[str, str], ...]:
    """Check a conversation and return it as a tuple of plain {role, content} dicts.

    Rules: an optional leading system turn, then user/assistant alternating starting with user, last is
    assistant. Extra keys (name, tool_calls, ...) are dropped because chat templates would render them
    inconsistently.
    """
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)) or len(raw) == 0:
        raise RowError("a conversation must be a non-empty list of {role, content} messages")
    messages: list[dict[str, str]] = []
    for i, message in enumerate(raw):
        if not isinstance(message, Mapping):
            raise RowError(f"message {i} is not an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RowError(f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RowError(f"message {i} ({role}) has no string 'content'")
        messages.append({"role": role, "content": content})
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if not body:
        raise RowError("the conversation has only a system message; it needs user and assistant turns")
    for i, message in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise RowError(
                f"roles must alternate user/assistant after an optional system turn; found {message['role']!r} "
                f"where {expected!r} was expected"
            )
    if body[-1]["role"] != "assistant":
        raise RowError("the last message must be from the assistant")
    return tuple(messages)


def require_str(row: Mapping[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise RowError(f"missing string field {key!r} (fields present: {', '.join(sorted(map(str, row)))})")
    return value
