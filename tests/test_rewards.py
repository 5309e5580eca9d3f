"""Reward verifiers: the real GSM8K test references, unit cases per key, module:function resolution."""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import pytest

from integration_training.errors import UserError
from integration_training.rewards import extract_gsm8k_strict, extract_last_number, resolve_reward

GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
CALCULATOR = re.compile(r"<<[^>]*>>")


@pytest.mark.skipif(not GSM8K_TEST.exists(), reason=f"{GSM8K_TEST} not present")
def test_gsm8k_scores_every_real_reference_answer():
    verifier = resolve_reward("gsm8k")
    rows = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines() if line.strip()]
    assert len(rows) > 1000
    for row in rows:
        completion = CALCULATOR.sub("", row["answer"])
        reference = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert verifier.strict(completion, reference) == 1.0, completion
        assert verifier.lenient(completion, reference) == 1.0, completion
        wrong = str(int(reference) + 1)
        assert verifier.strict(completion, wrong) == 0.0, completion
        assert verifier.lenient(completion, wrong) == 0.0, completion


@pytest.mark.parametrize(
    "text,expected",
    [
        ("so 5 + 5 = 10\n#### 10", "10"),
        ("#### 1,000", "1000"),
        ("#### 1,234,567", "1234567"),
        ("####   -7  ", "-7"),
        ("#### 2.50", "2.50"),
        ("#### $18", "18"),
        ("#### 4\nThat is all.", "4"),  # later lines are ignored
        ("#### 3\n#### 5", "5"),  # the LAST marker counts
        ("#### 5 dollars", None),  # units are not a number
        ("#### 18.", None),
        ("#### 1,00", None),  # malformed thousands grouping
        ("#### ", None),
        ("the answer is 42", None),
        ("", None),
    ],
)
def test_extract_gsm8k_strict(text, expected):
    assert extract_gsm8k_strict(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("the answer is 42", "42"),
        ("16-3-4=9 eggs", "9"),  # a minus between digits is subtraction, not a sign
        ("it drops to -3 degrees", "-3"),
        ("costs $1,250.50 total", "1250.50"),
        ("1, 2, 3", "3"),
        ("#### 72.", "72"),
        ("no digits here", None),
        ("version x2", None),
    ],
)
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected


@pytest.mark.parametrize("key", ["gsm8k", "arithmetic"])
def test_numeric_equality_and_strict_vs_lenient(key):
    v = resolve_reward(key)
    assert v.name == key
    assert v.strict("#### 72.0", "72") == 1.0
    assert v.strict("#### 72", "72.0") == 1.0
    assert v.strict("#### 1,000", "1000") == 1.0
    assert v.strict("#### 1000", "1,000") == 1.0
    assert v.strict("#### -5", "-5") == 1.0
    assert v.strict("#### 5", "-5") == 0.0
    assert v.strict("#### 0.5", "0.50") == 1.0
    assert v.strict("#### 0.51", "0.5") == 0.0
    # Lenient reads the last number; strict insists on the `####` format.
    assert (v.strict("The answer is 72.", "72"), v.lenient("The answer is 72.", "72")) == (0.0, 1.0)
    assert (v.strict("#### 72 apples", "72"), v.lenient("#### 72 apples", "72")) == (0.0, 1.0)
    # ...and they disagree the other way when text follows the answer line.
    assert (v.strict("#### 72\ncheck: 8*9=72, 3 ways", "72"), v.lenient("#### 72\nok 3", "72")) == (1.0, 0.0)
    assert v.strict("", "1") == 0.0 and v.lenient("", "1") == 0.0


def test_numeric_reference_must_be_a_number():
    with pytest.raises(UserError, match="not a number"):
        resolve_reward("gsm8k").strict("#### 3", "three")


def test_arc():
    v = resolve_reward("arc")
    assert v.strict("B", "B") == 1.0
    assert v.strict("  #### C\n", "C") == 1.0
    assert v.strict("Let me think.\nAnswer: D", "D") == 1.0
    assert v.strict("reasoning...\n#### A", "a") == 1.0  # reference normalised
    assert v.strict("B", "C") == 0.0
    assert v.strict("b", "B") == 0.0  # strict wants the capital letter
    assert v.strict("B.", "B") == 0.0
    assert v.strict("The answer is B", "B") == 0.0
    assert v.lenient("The answer is B", "B") == 1.0
    assert v.lenient("I think (C).", "C") == 1.0
    assert v.lenient("Both A and then E", "E") == 1.0
    assert v.lenient("Answer: Blue", "B") == 0.0  # B inside a word is not a standalone letter
    assert v.lenient("no letter", "A") == 0.0
    with pytest.raises(UserError, match="A-E"):
        v.strict("A", "Z")


def test_spelling():
    v = resolve_reward("spelling")
    assert v.strict("s-t-r-a-w\n#### strawberry", "strawberry") == 1.0
    assert v.strict("#### Strawberry ", "strawberry") == 1.0
    assert v.strict("#### 3", "3") == 1.0
    assert v.strict("#### straw berry", "strawberry") == 0.0
    assert v.strict("strawberry", "strawberry") == 0.0  # no marker
    assert v.lenient("strawberry", "strawberry") == 1.0
    assert v.lenient("The word is:\nStrawberry.", "strawberry") == 1.0
    assert v.lenient("so the count is 3", "3") == 1.0
    assert v.lenient("#### 3\n", "3") == 1.0
    assert v.lenient("strawberry is not it: raspberry", "strawberry") == 0.0
    assert v.lenient("", "x") == 0.0


def test_unknown_builtin_lists_supported_keys():
    with pytest.raises(UserError) as info:
        resolve_reward("gsm9k")
    message = str(info.value)
    for key in ("gsm8k", "arithmetic", "arc", "spelling", "module:function"):
        assert key in message


def test_module_function(tmp_path, monkeypatch):
    module = tmp_path / "my_rewards_mod.py"
    module.write_text(textwrap.dedent(
        """
        def exact(completion, reference):
            return completion.strip() == reference.strip()

        NOT_CALLABLE = 3
        """
    ))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards_mod", raising=False)
    v = resolve_reward("my_rewards_mod:exact")
    assert v.name == "my_rewards_mod:exact"
    assert v.strict(" hi ", "hi") == 1.0 and isinstance(v.strict("a", "a"), float)
    assert v.lenient("no", "hi") == 0.0
    with pytest.raises(UserError, match="no callable 'missing'"):
        resolve_reward("my_rewards_mod:missing")
    with pytest.raises(UserError, match="no callable 'NOT_CALLABLE'"):
        resolve_reward("my_rewards_mod:NOT_CALLABLE")
    with pytest.raises(UserError, match="cannot import module 'no_such_module_xyz'"):
        resolve_reward("no_such_module_xyz:f")
    with pytest.raises(UserError, match="module:function"):
        resolve_reward("my_rewards_mod:")
