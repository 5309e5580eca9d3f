"""allenai/ai2_arc (ARC-Easy / ARC-Challenge): multiple-choice prompt, the answer is one letter."""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

from integration_training.data.types import Example, RowError, require_str

NAME = "allenai/ai2_arc"
REWARD = "arc"
SUBSETS = ("ARC-Easy", "ARC-Challenge")


def render_prompt(question: str, letters: list[str], texts: list[str]) -> str:
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(letters, texts, strict=True))
    return (
        f"{question}\n\n{options}\n\n"
        f"Answer with the letter of the correct choice ({', '.join(letters)}) only."
    )


def to_example(row: Mapping[str, Any], source: str, reward: str | None) -> Example:
    question = require_str(row, "question")
    answer_key = require_str(row, "answerKey").strip()
    choices = row.get("choices")
    if not isinstance(choices, Mapping) or not isinstance(choices.get("text"), list) or not isinstance(
        choices.get("label"), list
    ):
        raise RowError("field 'choices' must be {'text': [...], 'label': [...]}")
    texts, labels = [str(t) for t in choices["text"]], [str(lab).strip() for lab in choices["label"]]
    if len(texts) != len(labels) or not 2 <= len(texts) <= 26:
        raise RowError("'choices' text and label lists must have the same length (2..26)")
    if answer_key not in labels:
        raise RowError(f"answerKey {answer_key!r} is not one of the choice labels {labels}")
    # Some ARC rows label choices "1".."4"; a single letter scheme keeps the verifier and prompt uniform.
    letters = list(string.ascii_uppercase[: len(labels)])
    letter = letters[labels.index(answer_key)]
    messages = (
        {"role": "user", "content": render_prompt(question, letters, texts)},
        {"role": "assistant", "content": letter},
    )
    return Example(messages=messages, reference=letter, reward=reward or REWARD, source=source)
