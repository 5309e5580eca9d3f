"""Tools the model can call while it writes: the textual calculator protocol and a safe calculator.

Protocol (GSM8K's own annotation format, used by nanochat): the model writes `<<EXPR=`; the sampling engine
evaluates EXPR with `calculate` and forces the tokens of `RESULT>>` into the row, then the model continues. Forced
tokens are context, never a training target (SFT loss mask 0; no policy gradient in RL). Both SFT rendering and
the rollout engine tokenise a forced span with `forced_token_ids`, so training sees exactly what sampling produced.

The calculator never evaluates user text as Python: a hand-written recursive-descent parser over digits, a decimal
point, thousands commas, `+ - * / ( )` and unary minus, in exact rational arithmetic (`fractions.Fraction`), with
bounded input length, nesting depth and magnitude, so every call ends in bounded time. Anything else yields a short
error string (which the model then sees as the result); `calculate` never raises.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

CALCULATOR = "calculator"
KNOWN_TOOLS = (CALCULATOR,)

CALL_OPEN = "<<"
CALL_EQUALS = "="
CALL_CLOSE = ">>"

MAX_CHARS = 120  # longest GSM8K train expression is 65 characters
MAX_DEPTH = 16  # nested parentheses / unary minus
MAX_DIGITS = 18  # digits in one number literal (before and after the point)
MAX_MAGNITUDE = Fraction(10) ** 18  # bound on |numerator| and denominator of every intermediate value
DECIMALS = 2  # a non-terminating result is rounded to this many decimals, as GSM8K's annotators mostly did
_DIGITS = frozenset("0123456789")  # ASCII only: str.isdigit() accepts other scripts' digits
_NUMBER = re.compile(r"(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?|\.[0-9]+")  # only ASCII digits by class
# A finished call inside text: `<<EXPR=RESULT>>` with no `<`/`>` inside (what SFT data and rollouts contain).
ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")


class CalcError(Exception):
    """Internal: a reason the expression was refused; `calculate` turns it into the error string."""


# ---------------------------------------------------------------------------------------------------- calculator


def calculate(expression: str) -> str:
    """EXPR → the result as GSM8K writes it ("24", "-3", "0.25", "3.33"), or "error: <reason>". Never raises."""
    try:
        if not isinstance(expression, str):
            return "error: not text"
        return format_number(evaluate(expression))
    except CalcError as error:
        return f"error: {error}"
    except (ArithmeticError, ValueError, RecursionError, MemoryError):  # defence in depth; the bounds prevent them
        return "error: cannot evaluate"


def evaluate(expression: str) -> Fraction:
    """Exact value of EXPR; raises CalcError for anything outside the grammar or the bounds."""
    if len(expression) > MAX_CHARS:
        raise CalcError(f"longer than {MAX_CHARS} characters")
    tokens = _tokenize(expression)
    if not tokens:
        raise CalcError("empty expression")
    parser = _Parser(tokens)
    value = parser.expression(0)
    if parser.position != len(tokens):
        raise CalcError(f"unexpected {tokens[parser.position]!r}")
    return value


def format_number(value: Fraction) -> str:
    """Integers plainly; terminating decimals exactly; others rounded to DECIMALS (trailing zeros dropped)."""
    if value.denominator == 1:
        return str(value.numerator)
    denominator, exponents = value.denominator, []
    for prime in (2, 5):
        count = 0
        while denominator % prime == 0:
            denominator //= prime
            count += 1
        exponents.append(count)
    # Terminating (denominator 2^a·5^b): exactly max(a, b) places; otherwise rounded to DECIMALS.
    places = max(exponents) if denominator == 1 else DECIMALS
    scaled = round(value * 10**places)  # Fraction rounding: exact, half to even
    sign = "-" if scaled < 0 else ""
    whole, frac = divmod(abs(scaled), 10**places)
    text = f"{whole}.{frac:0{places}d}".rstrip("0").rstrip(".")
    return sign + text if text != "0" else "0"


def _tokenize(expression: str) -> list[str]:
    tokens = []
    position = 0
    while position < len(expression):
        char = expression[position]
        if char == " ":
            position += 1
        elif char in "+-*/()":
            tokens.append(char)
            position += 1
        elif char in _DIGITS or char == ".":
            match = _NUMBER.match(expression, position)
            if match is None:
                raise CalcError(f"bad number at {position}")
            literal = match.group(0)
            if sum(c in _DIGITS for c in literal) > MAX_DIGITS:
                raise CalcError(f"number longer than {MAX_DIGITS} digits")
            tokens.append(literal)
            position = match.end()
        else:
            raise CalcError(f"unsupported character {char!r}")
    return tokens


class _Parser:
    """expression := term (('+' | '-') term)*; term := unary (('*' | '/') unary)*;
    unary := '-' unary | '+' unary | primary; primary := NUMBER | '(' expression ')'."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.position = 0

    def _peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def _take(self) -> str:
        token = self._peek()
        if token is None:
            raise CalcError("unexpected end")
        self.position += 1
        return token

    def expression(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self._peek() in ("+", "-"):
            operator = self._take()
            right = self.term(depth)
            value = _bounded(value + right if operator == "+" else value - right)
        return value

    def term(self, depth: int) -> Fraction:
        value = self.unary(depth)
        while self._peek() in ("*", "/"):
            operator = self._take()
            right = self.unary(depth)
            if operator == "*":
                value = _bounded(value * right)
            elif right == 0:
                raise CalcError("division by zero")
            else:
                value = _bounded(value / right)
        return value

    def unary(self, depth: int) -> Fraction:
        if depth > MAX_DEPTH:
            raise CalcError(f"nested deeper than {MAX_DEPTH}")
        if self._peek() in ("-", "+"):
            operator = self._take()
            value = self.unary(depth + 1)
            return -value if operator == "-" else value
        return self.primary(depth)

    def primary(self, depth: int) -> Fraction:
        token = self._take()
        if token == "(":
            value = self.expression(depth + 1)
            if self._take() != ")":
                raise CalcError("missing ')'")
            return value
        if token[0] in _DIGITS or token[0] == ".":
            return _bounded(Fraction(token.replace(",", "")))
        raise CalcError(f"unexpected {token!r}")


def _bounded(value: Fraction) -> Fraction:
    if abs(value.numerator) > MAX_MAGNITUDE or value.denominator > MAX_MAGNITUDE:
        raise CalcError("number too large")
    return value


# ---------------------------------------------------------------------------------------------------- protocol


@dataclass(frozen=True)
class ToolCall:
    expression: str
    result: str  # what was forced (the calculator's answer or its error string)


def validate_tools(tools: Sequence[str]) -> list[str]:
    """Problems with a configured tool list (empty list = fine)."""
    problems = [f"unknown tool {t!r} (known: {', '.join(KNOWN_TOOLS)})" for t in tools if t not in KNOWN_TOOLS]
    if len(set(tools)) != len(tools):
        problems.append("a tool is listed twice")
    return problems


def pending_call(text: str) -> str | None:
    """If `text` (a completion so far) ends with an open call `<<EXPR=`, EXPR; else None."""
    if not text.endswith(CALL_EQUALS):
        return None
    start = text.rfind(CALL_OPEN)
    if start < 0:
        return None
    expression = text[start + len(CALL_OPEN) : -len(CALL_EQUALS)]
    if CALL_CLOSE in expression or CALL_EQUALS in expression or "<" in expression or len(expression) > MAX_CHARS:
        return None
    return expression


def forced_text(expression: str) -> str:
    """The span the engine forces after `<<EXPR=`: `RESULT>>`."""
    return calculate(expression) + CALL_CLOSE


def forced_token_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a forced span, encoded on its own: the one tokenisation SFT rendering and rollouts share."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert ids, f"forced span {text!r} encodes to no tokens"
    return ids


def forced_char_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of every `RESULT>>` after `<<EXPR=` in `text` — the forced spans in SFT data."""
    return [(m.start(2), m.end(0)) for m in ANNOTATION.finditer(text)]


def equals_token_table(tokenizer: Any, vocab_size: int) -> list[bool]:
    """Per token id: does its text end with '=' (only then can a call have just opened)."""
    table = [False] * vocab_size
    for token_id in range(min(vocab_size, len(tokenizer))):
        table[token_id] = tokenizer.decode([token_id]).endswith(CALL_EQUALS)
    return table


# ---------------------------------------------------------------------------------------------------- sampling engine


class ToolRunner:
    """What the rollout engine needs to run the calculator protocol for one tokenizer.

    `ends_with_equals(vocab, device)` is a [V] bool table (built once per vocabulary size and device, by decoding
    every token once): the engine looks at a row's text only after it drew a token that ends in '='. `forced_for`
    decodes just the row's last `TAIL_TOKENS` tokens (every token is at least one character, so an open call of at
    most MAX_CHARS characters fits) and returns the forced token ids, or None when no call is open.
    """

    TAIL_TOKENS = MAX_CHARS + len(CALL_OPEN) + len(CALL_EQUALS) + 1

    def __init__(self, tokenizer: Any, tools: Sequence[str]) -> None:
        assert tools and not validate_tools(tools), tools
        self.tokenizer = tokenizer
        self.tools = tuple(tools)
        self._tables: dict[tuple[int, str], Any] = {}

    def ends_with_equals(self, vocab_size: int, device: Any) -> Any:
        import torch

        key = (vocab_size, str(device))
        if key not in self._tables:
            table = equals_token_table(self.tokenizer, vocab_size)
            self._tables[key] = torch.tensor(table, dtype=torch.bool, device=device)
        return self._tables[key]

    def forced_for(self, completion_ids: Sequence[int]) -> list[int] | None:
        tail = list(completion_ids[-self.TAIL_TOKENS :])
        expression = pending_call(self.tokenizer.decode(tail, skip_special_tokens=False))
        if expression is None:
            return None
        return forced_token_ids(self.tokenizer, forced_text(expression))


def tool_runner(tokenizer: Any, tools: Sequence[str]) -> ToolRunner | None:
    """The engine's tool hook for a configured tool list; None when tools are off (the sampler's unchanged path)."""
    return ToolRunner(tokenizer, tools) if tools else None


def tool_calls(text: str) -> list[dict[str, str]]:
    """The calls in a completion's text, for evaluation records: [{"expression", "result"}]."""
    return [{"expression": m.group(1), "result": m.group(2)} for m in ANNOTATION.finditer(text)]
