"""Pure reward verifiers: (completion text, reference) -> float in {0.0, 1.0}.

Model output is only ever matched with regular expressions and parsed as numbers; it is never `eval`-ed or
executed. Two parsers per task: `strict` (the trained answer format; used for RL rewards) and `lenient`
(a forgiving reading, reported beside strict in evaluation so format failures are visible).

Number rules (gsm8k, arithmetic):
- strict: take the first line after the LAST `####`; after stripping surrounding whitespace it must be exactly
  one number: optional `-`, optional leading `$`, digits with optional thousands commas (`1,000`, not `1,00`),
  optional decimal part. Nothing else on that line (no units, no trailing period). Later lines are ignored.
- lenient: the last number anywhere in the completion (same number syntax, `$` not required).
- equality is numeric and exact (digit strings, any length): "72" == "72.0" == "$72", "1,000" == "1000".
Every verifier is total and linear-time in the completion's length: any text gives 0.0 or 1.0, never an exception.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from integration_training.errors import UserError

Score = Callable[[str, str], float]


@dataclass(frozen=True)
class Verifier:
    name: str
    strict: Score
    lenient: Score


# A number: thousands-grouped or plain integer part, optional decimals. The lookbehind stops "10-3" from reading
# as "-3" and "x1" / the tail of "1.5" from matching on their own; the lookahead stops "1,2345" reading as "1,234".
_NUMBER_BODY = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_ANY_NUMBER = re.compile(rf"(?<![\w.])-?\$?{_NUMBER_BODY}(?!\d)")
_STRICT_NUMBER = re.compile(rf"-?\$?{_NUMBER_BODY}")
_MARKER = "####"


def _canonical(number: str) -> tuple[bool, str, str]:
    """(negative, integer digits, fraction digits) with leading/trailing zeros dropped: exact numeric identity.

    Compared as digit strings, not parsed into int/Fraction: a completion may hold a number of any length, and
    Python refuses to parse integers beyond its int-string limit (4300 digits) — a verifier must never raise.
    """
    text = number.replace(",", "").replace("$", "")
    negative = text.startswith("-")
    whole, _, fraction = text.lstrip("-").partition(".")
    whole, fraction = whole.lstrip("0"), fraction.rstrip("0")
    return (negative and bool(whole or fraction), whole, fraction)


def extract_gsm8k_strict(text: str) -> str | None:
    """The number on the first line after the last `####` (commas/`$` removed), or None if malformed/absent."""
    if _MARKER not in text:
        return None
    answer = text.rsplit(_MARKER, 1)[1].lstrip(" \t").split("\n", 1)[0].strip()
    if not _STRICT_NUMBER.fullmatch(answer):
        return None
    return answer.replace(",", "").replace("$", "")


def extract_last_number(text: str) -> str | None:
    """The last number anywhere in `text` (commas/`$` removed), or None."""
    matches = _ANY_NUMBER.findall(text)
    if not matches:
        return None
    return matches[-1].replace(",", "").replace("$", "")


def _reference_number(reference: str, key: str) -> tuple[bool, str, str]:
    cleaned = reference.strip()
    if not _STRICT_NUMBER.fullmatch(cleaned):
        raise UserError(
            f"reward {key!r}: reference {reference!r} is not a number; use a numeric reference or another reward"
        )
    return _canonical(cleaned)


def _numeric_verifier(key: str) -> Verifier:
    def strict(completion: str, reference: str) -> float:
        got = extract_gsm8k_strict(completion)
        return float(got is not None and _canonical(got) == _reference_number(reference, key))

    def lenient(completion: str, reference: str) -> float:
        got = extract_last_number(completion)
        return float(got is not None and _canonical(got) == _reference_number(reference, key))

    return Verifier(name=key, strict=strict, lenient=lenient)


# ARC: the answer segment is what follows the last `####`, else the last `Answer:`, else the whole completion.
_ANSWER_LABEL = re.compile(r"answer\s*:", re.IGNORECASE)
_LETTER = re.compile(r"[A-E]")
_STANDALONE_LETTER = re.compile(r"(?<![A-Za-z])[A-E](?![A-Za-z])")


def _arc_reference(reference: str) -> str:
    letter = reference.strip().upper()
    if not _LETTER.fullmatch(letter):
        raise UserError(f"reward 'arc': reference {reference!r} is not a letter A-E")
    return letter


def _arc_answer_segment(completion: str) -> str:
    if _MARKER in completion:
        return completion.rsplit(_MARKER, 1)[1]
    labels = list(_ANSWER_LABEL.finditer(completion))
    if labels:
        return completion[labels[-1].end():]
    return completion


def _arc_strict(completion: str, reference: str) -> float:
    """Exactly one capital letter A-E, optionally after `####` or `Answer:`; nothing else in that segment."""
    answer = _arc_answer_segment(completion).strip()
    return float(bool(_LETTER.fullmatch(answer)) and answer == _arc_reference(reference))


def _arc_lenient(completion: str, reference: str) -> float:
    """The last standalone capital letter A-E anywhere (so "I think B." counts, and so would a stray "A")."""
    letters = _STANDALONE_LETTER.findall(completion)
    return float(bool(letters) and letters[-1] == _arc_reference(reference))


def _normalise_word(text: str) -> str:
    return text.strip().strip(".!?\"'`").strip().casefold()


def _spelling_strict(completion: str, reference: str) -> float:
    """Text after the last `####` (whole remainder, stripped) equals the reference, case-insensitively."""
    if _MARKER not in completion:
        return 0.0
    answer = completion.rsplit(_MARKER, 1)[1].strip()
    return float(answer.casefold() == reference.strip().casefold())


def _spelling_lenient(completion: str, reference: str) -> float:
    """The reference is the last non-empty line, or the last whitespace token (edge punctuation ignored)."""
    want = _normalise_word(reference)
    lines = [line for line in completion.splitlines() if line.strip()]
    if not lines:
        return 0.0
    last_line = lines[-1].replace(_MARKER, " ")
    tokens = last_line.split()
    return float(_normalise_word(last_line) == want or (bool(tokens) and _normalise_word(tokens[-1]) == want))


_BUILTIN: dict[str, Callable[[], Verifier]] = {
    "gsm8k": lambda: _numeric_verifier("gsm8k"),
    "arithmetic": lambda: _numeric_verifier("arithmetic"),
    "arc": lambda: Verifier(name="arc", strict=_arc_strict, lenient=_arc_lenient),
    "spelling": lambda: Verifier(name="spelling", strict=_spelling_strict, lenient=_spelling_lenient),
}


def resolve_reward(key: str) -> Verifier:
    """A built-in verifier by name, or `module:function` naming a user function (used as strict and lenient)."""
    if ":" in key:
        return _import_verifier(key)
    if key not in _BUILTIN:
        raise UserError(
            f"reward {key!r} is not a built-in verifier; use one of {sorted(_BUILTIN)} "
            "or 'module:function' naming a function (completion, reference) -> float"
        )
    return _BUILTIN[key]()


def _import_verifier(key: str) -> Verifier:
    module_name, _, function_name = key.partition(":")
    if not module_name or not function_name or ":" in function_name:
        raise UserError(f"reward {key!r}: expected 'module:function', e.g. 'my_rewards:exact_match'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserError(
            f"reward {key!r}: cannot import module {module_name!r} ({error}); "
            "make it importable (install it or put it on PYTHONPATH)"
        ) from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserError(
            f"reward {key!r}: module {module_name!r} has no callable {function_name!r}; "
            "define def {0}(completion: str, reference: str) -> float".format(function_name)
        )

    def score(completion: str, reference: str) -> float:
        try:
            value = float(function(completion, reference))
        except Exception as error:  # the user's code: name it, with the first line of what it raised
            raise UserError(
                f"reward {key!r} raised {type(error).__name__}: {str(error)[:120]} on a completion; "
                "make it return a number for any text"
            ) from error
        if not math.isfinite(value):
            raise UserError(f"reward {key!r} returned {value} (non-finite); return a finite number for any text")
        return value

    return Verifier(name=key, strict=score, lenient=score)
