"""The one record every data source produces, and the small helpers adapters share."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")
# Chat-template control strings (ChatML `<|im_start|>`, `<|im_end|>`, `<|endoftext|>`, Llama-3 `<|eot_id|>`,
# `<|start_header_id|>`, ...). Inside content they would be tokenised as real control tokens, letting a row forge
# turns of another role. Rows holding one are refused (not silently rewritten): the user decides how to clean them.
CONTROL_STRING = re.compile(r"<\|[A-Za-z0-9_.:-]{1,40}\|>")


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
        if not content.strip():
            raise RowError(f"message {i} ({role}) is empty or whitespace only; every turn needs text")
        control = CONTROL_STRING.search(content)
        if control:
            raise RowError(
                f"message {i} ({role}) contains the chat-template control string {control.group()!r}, which would "
                "become a real control token (a forged turn); remove or escape it in the data"
            )
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


def numbered_lines(path) -> list[tuple[int, str]]:
    """(line number, text) of a UTF-8 text file; a line that is not UTF-8 is a UserError naming `file:line`."""
    from integration_training.errors import UserError

    lines = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            lines.append((number, raw.decode("utf-8")))
        except UnicodeDecodeError as error:
            raise UserError(
                f"{path}:{number}: not UTF-8 (byte {raw[error.start]:#04x} at column {error.start + 1}); "
                "save the file as UTF-8"
            ) from None
    return lines


MAX_JSON_DEPTH = 64  # a conversation row is 3 levels deep; anything far deeper is malformed or hostile


def loads_row(text: str) -> Any:
    """json.loads for one row: malformed, absurdly nested or huge-number JSON is a RowError, never a crash."""
    import json

    depth = _bracket_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise RowError(f"JSON nested {depth} levels deep (more than {MAX_JSON_DEPTH}); a row is a list of messages")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise RowError(f"invalid JSON ({error.msg} at column {error.colno})") from None
    except (RecursionError, ValueError) as error:  # ValueError: an integer longer than Python's digit limit
        raise RowError(f"unreadable JSON ({type(error).__name__}: {str(error)[:80]})") from None


def _bracket_depth(text: str) -> int:
    """Maximum nesting of [ and { outside strings (cheap, linear; bounds json.loads' recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest
