"""openai/gsm8k: question → worked answer ending in `#### N`; calculator annotations removed."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from integration_training.data.types import Example, RowError, require_str

NAME = "openai/gsm8k"
REWARD = "gsm8k"
# `<<48/2=24>>` is a calculator call the original annotators inserted; the model should not learn to emit it.
_CALCULATOR = re.compile(r"<<[^<>]*>>")


def clean_answer(answer: str) -> str:
    return _CALCULATOR.sub("", answer)


def extract_reference(answer: str) -> str:
    """The number after the final `####`, commas stripped ("1,000" → "1000")."""
    if "####" not in answer:
        raise RowError("answer has no final '#### N' line")
    reference = answer.rsplit("####", 1)[1].strip().replace(",", "")
    if not reference:
        raise RowError("answer's '####' line is empty")
    return reference


def to_example(row: Mapping[str, Any], source: str, reward: str | None) -> Example:
    question = require_str(row, "question")
    answer = clean_answer(require_str(row, "answer"))
    reference = extract_reference(answer)
    assert "<<" not in answer or ">>" not in answer, "calculator annotations survived cleaning"
    messages = ({"role": "user", "content": question}, {"role": "assistant", "content": answer})
    return Example(messages=messages, reference=reference, reward=reward or REWARD, source=source)
