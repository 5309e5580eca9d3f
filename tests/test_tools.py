"""The calculator tool: exact, bounded, never raises; the `<<EXPR=RESULT>>` protocol helpers."""

from __future__ import annotations

import json
import random
import re
from fractions import Fraction
from pathlib import Path

import pytest

from integration_training.tools import (
    MAX_CHARS,
    MAX_DEPTH,
    calculate,
    evaluate,
    forced_char_spans,
    format_number,
    pending_call,
    validate_tools,
)

GSM8K_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


@pytest.mark.parametrize(("expression", "result"), [
    ("48/2", "24"), ("1,000*2", "2000"), ("2-.5", "1.5"), ("-3+1", "-2"), ("-(2*-3)", "6"), ("10/3", "3.33"),
    ("2/3", "0.67"), ("1/8", "0.125"), ("0.1+0.2", "0.3"), (" ( 1 + 2 ) * 3 ", "9"), ("--4", "4"), ("+5", "5"),
    ("12,345.5+0.5", "12346"), ("-1/3", "-0.33"), ("0-0.001", "-0.001"), ("-1/1000", "-0.001"), ("1/300", "0"),
])
def test_calculator_known_values(expression, result):
    assert calculate(expression) == result


@pytest.mark.parametrize("expression", [
    "__import__('os').system('ls')", "9**9**9", "2**3", "1/0", "5/(3-3)", "1e5", "x+1", "", "   ", "1+", "(1+2",
    "1+2)", "١+٢", "１+２", "12,34", "1..2", "1.2.3", "()", "*3", "3 3", "9" * 19, "99999999999*99999999999",
    "(" * 1000 + "1" + ")" * 1000, "-" * 100 + "1", "1" * 10_000, "1+" * 5000 + "1", "\x00", "1//2", "1%2", "abs(-1)",
    "1 = 2", "<<1+1=", "True", "None", "lambda: 0",
])
def test_calculator_refuses_with_a_short_error(expression):
    out = calculate(expression)
    assert out.startswith("error: ") and len(out) < 60, out


def test_calculator_magnitude_and_depth_bounds():
    assert calculate("(" * MAX_DEPTH + "1" + ")" * MAX_DEPTH) == "1"
    assert calculate("(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1)).startswith("error")
    assert calculate("999999999*999999999") == "999999998000000001"  # just under 10^18
    assert calculate("1000000000*1000000001").startswith("error")  # just over
    assert calculate("1/1000000000/1000000001").startswith("error")  # denominator over the bound
    assert calculate("999999999999999999*999999999999999999*999999999999999999").startswith("error")
    assert calculate("1" * (MAX_CHARS + 1)).startswith("error")


def test_calculator_fuzz_never_raises_and_agrees_with_fractions():
    rng = random.Random(0)
    alphabet = "0123456789+-*/(). ,=<>e_x^%!\"'\\\n\t٣"
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        out = calculate(text)
        assert isinstance(out, str) and out
    for _ in range(2000):  # well-formed expressions: the value is exactly the rational result
        numbers = [Fraction(rng.randint(0, 999), rng.choice([1, 1, 10, 100])) for _ in range(rng.randint(1, 5))]
        operators = [rng.choice("+-*/") for _ in numbers[1:]]
        text = format_number(numbers[0])
        value = numbers[0]
        terms, ops = [numbers[0]], []
        for op, number in zip(operators, numbers[1:]):
            text += f" {op} {format_number(number)}"
            terms.append(number)
            ops.append(op)
        expected = _reference_value(terms, ops)
        out = calculate(text)
        if expected is None:
            assert out == "error: division by zero"
        else:
            assert evaluate(text) == expected, text
            del value


def _reference_value(terms, ops):
    """Precedence by hand: fold * and / first, then + and -."""
    stack, signs = [terms[0]], []
    for op, term in zip(ops, terms[1:]):
        if op in "*/":
            if op == "/" and term == 0:
                return None
            stack[-1] = stack[-1] * term if op == "*" else stack[-1] / term
        else:
            stack.append(term)
            signs.append(op)
    total = stack[0]
    for sign, term in zip(signs, stack[1:]):
        total = total + term if sign == "+" else total - term
    return total


def test_pending_call_and_forced_spans():
    assert pending_call("so <<48/2=") == "48/2"
    assert pending_call("<<1+1=2>> then <<2*3=") == "2*3"
    assert pending_call("<<1+1=2>> x =") is None
    assert pending_call("a = ") is None and pending_call("no call=") is None
    text = "He has <<48/2=24>>24 and <<24+1=25>>25."
    spans = forced_char_spans(text)
    assert [text[s:e] for s, e in spans] == ["24>>", "25>>"]


def test_validate_tools():
    assert validate_tools([]) == [] and validate_tools(["calculator"]) == []
    assert validate_tools(["python"]) and validate_tools(["calculator", "calculator"])


@pytest.mark.skipif(not GSM8K_TRAIN.is_file(), reason=f"GSM8K train split not present at {GSM8K_TRAIN}")
def test_calculator_reproduces_gsm8k_annotations():
    """≥ 99 % of GSM8K train's `<<EXPR=RESULT>>` annotations: the value, or the value rounded as the annotator did."""
    total, reproduced, misses = 0, 0, []
    for line in GSM8K_TRAIN.read_text().splitlines():
        for match in re.finditer(r"<<([^<>]*)>>", json.loads(line)["answer"]):
            total += 1
            expression, _, annotated = match.group(1).rpartition("=")
            out = calculate(expression)
            try:
                want = Fraction(annotated.replace(",", "").strip())
            except (ValueError, ZeroDivisionError):
                misses.append("unparseable annotated result")
                continue
            if out.startswith("error"):
                misses.append(out)
                continue
            places = len(annotated.split(".")[1]) if "." in annotated else 0
            value = evaluate(expression)
            if value == want or round(value * 10**places) == want * 10**places:
                reproduced += 1
            else:
                misses.append("different value")
    assert total > 20_000
    assert reproduced / total >= 0.99, (reproduced / total, sorted(set(misses)))
