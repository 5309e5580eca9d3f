"""openai/gsm8k: question → worked answer ending in `#### N`; calculator annotations removed (kept, as tool
calls, with data.tools=["calculator"])."""

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


def with_calculator(answer: str) -> str:
    """Tools on: keep each `<<EXPR=RESULT>>`, RESULT rewritten to what the calculator returns (so SFT trains on
    exactly what sampling forces: "144" for an annotator's "144.00"); an annotation the calculator refuses
    (`560//10`, 2 of 23,716 in train) is removed as with tools off, so the model never learns a failing call."""
    from integration_training.tools import ANNOTATION, calculate

    def rewrite(match: re.Match) -> str:
        call = ANNOTATION.fullmatch(match.group(0))  # None: no `=` inside, not a call
        result = calculate(call.group(1)) if call is not None else "error"
        return "" if result.startswith("error") else f"<<{call.group(1)}={result}>>"

    return _CALCULATOR.sub(rewrite, answer)


def to_example_with_calculator(row: Mapping[str, Any], source: str, reward: str | None) -> Example:
    """As `to_example`, keeping the calculator annotations (data.tools contains "calculator")."""
    question = require_str(row, "question")
    raw = require_str(row, "answer")
    reference = extract_reference(clean_answer(raw))
    messages = ({"role": "user", "content": question}, {"role": "assistant", "content": with_calculator(raw)})
    return Example(messages=messages, reference=reference, reward=reward or REWARD, source=source)


def to_example(row: Mapping[str, Any], source: str, reward: str | None) -> Example:
    question = require_str(row, "question")
    answer = clean_answer(require_str(row, "answer"))
    reference = extract_reference(answer)
    assert "<<" not in answer or ">>" not in answer, "calculator annotations survived cleaning"
    messages = ({"role": "user", "content": question}, {"role": "assistant", "content": answer})
    return Example(messages=messages, reference=reference, reward=reward or REWARD, source=source)
