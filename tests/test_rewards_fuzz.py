"""Verifiers are total: any completion text gives 0.0 or 1.0, never an exception, in time linear in its length.

Generated inputs: random mixes of digits, separators, markers and unicode; very long numbers (beyond Python's
4300-digit int-string limit); pathological repetitions that would make a backtracking regex explode.
"""

from __future__ import annotations

import random

import pytest

from integration_training.errors import UserError
from integration_training.rewards import resolve_reward

BUILTIN = ("gsm8k", "arithmetic", "arc", "spelling")
ALPHABET = list("0123456789,.-$ \n\t#abcABCDE:") + ["####", "Answer:", "\u00a0", "٣", "é", "\x00", "1,000", "<|im_end|>"]
REFERENCES = {"gsm8k": "42", "arithmetic": "-7", "arc": "B", "spelling": "c-a-t"}


def random_text(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(length))


def hostile_texts() -> list[str]:
    digits = "9" * 5000
    return [
        "",
        f"#### {digits}",
        f"the answer is {digits}",
        f"#### -{digits}.{digits}",
        "#### " + ",".join(["123"] * 3000),
        "1," * 20000,
        "#### " + "1" * 100_000 + "x",
        "-" * 50_000 + "1",
        "$" * 50_000,
        "." * 50_000 + "5",
        "####" * 20_000,
        "Answer:" * 20_000,
        "A " * 50_000,
        "\n" * 50_000,
        "\x00\udcff" * 1000,  # a lone surrogate, as a bad decode could leave
    ]


@pytest.mark.parametrize("key", BUILTIN)
def test_builtin_verifiers_never_raise(key):
    verifier = resolve_reward(key)
    rng = random.Random(key)
    texts = hostile_texts() + [random_text(rng, rng.randint(0, 400)) for _ in range(400)]
    for text in texts:
        for score in (verifier.strict, verifier.lenient):
            value = score(text, REFERENCES[key])
            assert value in (0.0, 1.0), (key, text[:80], value)


@pytest.mark.parametrize("key", ("gsm8k", "arithmetic"))
def test_long_numbers_compare_exactly(key):
    verifier = resolve_reward(key)
    big = "1" + "0" * 6000
    assert verifier.strict(f"#### {big}", big) == 1.0
    assert verifier.strict(f"#### {big}.000", big) == 1.0
    assert verifier.strict(f"#### {big}1", big) == 0.0
    assert verifier.lenient(f"so {big}", big) == 1.0
    assert verifier.strict("#### -0", "0") == 1.0 and verifier.strict("#### 0.50", "0.5") == 1.0


def test_a_user_reward_that_raises_is_named(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def fragile(completion, reference):\n    return int(completion)\n"
        "def nan(completion, reference):\n    return float('nan')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match="my_rewards:fragile.*raised ValueError"):
        resolve_reward("my_rewards:fragile").strict("not a number", "1")
    with pytest.raises(UserError, match="non-finite"):
        resolve_reward("my_rewards:nan").strict("x", "1")
