"""arithmetic: procedural "a + b − c" word problems in GSM8K answer format, fully offline.

Train and test never share a problem: each (a, b, c) triple belongs to exactly one split by a stable hash,
so the held-out set measures generalisation to unseen numbers, whatever the seeds and sample sizes.
"""

from __future__ import annotations

import functools
import hashlib
import random

from integration_training.data.types import Example
from integration_training.errors import UserError

NAME = "arithmetic"
REWARD = "arithmetic"
SPLITS = ("train", "test")
TEST_FRACTION_MOD = 5  # 1 in 5 triples is a test problem
# a, b ≤ 49 keeps every number at most two digits: the worked answer is ≤ 22 tokens with SmolLM2's digit-by-digit
# tokenizer (sampling cost on CPU is per token), and two-digit carries still leave a 135M model plenty to learn.
OPERAND_MIN, OPERAND_MAX = 2, 49

_NAMES = ("Mia", "Noah", "Ava", "Liam", "Zoe", "Omar", "Lena", "Ravi", "Sofia", "Ken", "Ivy", "Tom")
_ITEMS = ("marbles", "stickers", "apples", "coins", "books", "shells", "cards", "pencils", "stamps", "cookies")
# Stories name the person instead of using pronouns, so no grammar depends on the name drawn.
_STORIES = (
    "{name} wins {b} more and then gives {c} away.",
    "{name} finds {b} more and then loses {c}.",
    "A friend gives {name} {b} more, and then {name} trades away {c}.",
    "{name} buys {b} more and later gives {c} to a neighbour.",
)


def split_of(a: int, b: int, c: int) -> str:
    digest = hashlib.sha256(f"{a},{b},{c}".encode()).digest()
    return "test" if digest[0] % TEST_FRACTION_MOD == 0 else "train"


def render(name: str, item: str, story: str, a: int, b: int, c: int) -> tuple[str, str]:
    question = f"{name} has {a} {item}. {story.format(name=name, b=b, c=c)} How many {item} does {name} have now?"
    total = a + b
    # GSM8K's worked-answer shape (one line per operation, then "#### N"), written like the calculator
    # annotations inside GSM8K's <<...>>: no spaces, which the tokenizer would spend a token on each.
    answer = f"{a}+{b}={total}\n{total}-{c}={total - c}\n#### {total - c}"
    return question, answer


# Both splits hold more than this many problems (tests check), so the ~1 s count of `capacity` runs only for requests
# that might exceed it.
ALWAYS_AVAILABLE = 20_000


@functools.lru_cache(maxsize=None)
def capacity(split: str) -> int:
    """How many distinct (a, b, c) problems `split` holds: asking for more could never finish."""
    assert split in SPLITS
    return sum(
        split_of(a, b, c) == split
        for a in range(OPERAND_MIN, OPERAND_MAX + 1)
        for b in range(OPERAND_MIN, OPERAND_MAX + 1)
        for c in range(1, a + b + 1)
    )


def generate(split: str, count: int, seed: int, source: str, reward: str | None) -> list[Example]:
    """`count` distinct problems of `split`, deterministic in (split, seed)."""
    assert split in SPLITS and count >= 0
    if count > ALWAYS_AVAILABLE and count > capacity(split):
        raise UserError(
            f"{source}: max_samples={count} asks for more distinct problems than the {split} split has "
            f"({capacity(split)}); lower max_samples (use repeat to see problems more than once)"
        )
    rng = random.Random(f"arithmetic/{split}/{seed}")
    seen: set[tuple[int, int, int]] = set()
    examples = []
    while len(examples) < count:
        a, b = rng.randint(OPERAND_MIN, OPERAND_MAX), rng.randint(OPERAND_MIN, OPERAND_MAX)
        c = rng.randint(1, a + b)  # never negative: the answer is a count of things
        if (a, b, c) in seen or split_of(a, b, c) != split:
            continue
        seen.add((a, b, c))
        story = rng.choice(_STORIES)
        question, answer = render(rng.choice(_NAMES), rng.choice(_ITEMS), story, a, b, c)
        messages = ({"role": "user", "content": question}, {"role": "assistant", "content": answer})
        examples.append(Example(messages=messages, reference=str(a + b - c), reward=reward or REWARD, source=source))
    return examples
