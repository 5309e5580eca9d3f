"""custom_json: a user's JSONL file, one conversation per line.

A line is either a list of {role, content} messages or an object {"messages": [...], "reference": "..."?}.
Roles alternate user/assistant after an optional system turn; the last is assistant. Any bad line is a
UserError naming `file:line`, because a silently skipped line is a silently changed training set.
"""

from __future__ import annotations

import json
from pathlib import Path

from integration_training.data.types import Example, RowError, loads_row, numbered_lines, validate_messages
from integration_training.errors import UserError

NAME = "custom_json"


def parse_line(text: str) -> tuple[tuple[dict[str, str], ...], str | None]:
    value = loads_row(text)
    reference = None
    if isinstance(value, dict):
        if "messages" not in value:
            raise RowError("an object line needs a 'messages' list")
        reference = value.get("reference")
        if reference is not None and not isinstance(reference, str):
            raise RowError("'reference' must be a string")
        value = value["messages"]
    return validate_messages(value), reference


def load_file(path: Path, source: str, reward: str | None) -> list[Example]:
    if not path.is_file():
        raise UserError(f"custom_json: file {path} does not exist; set DatasetSpec.path to a JSONL file")
    examples = []
    for number, line in numbered_lines(path):
        if not line.strip():
            continue
        try:
            messages, reference = parse_line(line)
        except RowError as error:
            raise UserError(f"{path}:{number}: {error}; fix this line of the custom_json file") from None
        examples.append(Example(messages=messages, reference=reference, reward=reward, source=source))
    if not examples:
        raise UserError(f"{path}: the custom_json file has no conversations")
    return examples
