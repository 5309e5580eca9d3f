"""word_problems: procedural multi-step word problems for use with the calculator, fully offline.

Harder than `arithmetic` in the part a calculator cannot do: the work is choosing operands and operations from
the story. Each problem takes 3-4 steps over + − × ÷ ("twice as many", "shared equally", "half of"), quantities
up to 3 digits, with one or two distractor sentences carrying irrelevant numbers, and an exact integer answer.

The worked answer is one calculator call per line in GSM8K's annotation form, `<<48/2=24>>`, then `#### N`:
with `data.tools=["calculator"]` the model writes `<<48/2=` and the engine forces `24>>`. With tools off the
annotations become plain `48/2=24` lines (`plain_answer`), the `arithmetic` task's form.

Train and test never share a problem: each (template, numbers) tuple belongs to one split by a stable hash.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable

from integration_training.data.types import Example
from integration_training.errors import UserError

NAME = "word_problems"
REWARD = "arithmetic"  # the numeric `#### N` verifier
SPLITS = ("train", "test")
TEST_FRACTION_MOD = 5  # 1 in 5 problems is a test problem
MAX_QUANTITY = 999  # every number in a problem and its work has at most 3 digits

_NAMES = ("Mia", "Noah", "Ava", "Liam", "Zoe", "Omar", "Lena", "Ravi", "Sofia", "Ken", "Ivy", "Tom")
_ITEMS = ("marbles", "stickers", "apples", "coins", "books", "shells", "cards", "pencils", "stamps", "cookies")
_MULTIPLES = {2: "twice", 3: "three times", 4: "four times"}
_DISTRACTORS = (
    "{name} is {x} years old.",
    "The shop is {x} metres from {name}'s house.",
    "{name}'s cousin collects {x} postcards, which do not count here.",
    "Last year {name} had {x} {item}, but that does not matter now.",
    "The bus ride takes {x} minutes.",
)

Problem = tuple[str, list[tuple[str, int]], int]  # (story, [(expression, value)] steps, answer)


def _shared_equally(rng: random.Random, name: str, other: str, item: str) -> Problem | None:
    packs, per_pack, friends = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 9)
    bought = packs * per_pack
    each = bought // friends + rng.randint(1, 25)
    extra = each * friends - bought
    total = bought + extra
    story = (f"{name} buys {packs} packs of {item} with {per_pack} {item} in each pack. {other} gives {name} {extra} "
             f"more {item}. {name} shares all the {item} equally among {friends} friends. "
             f"How many {item} does each friend get?")
    return story, [(f"{packs}*{per_pack}", bought), (f"{bought}+{extra}", total), (f"{total}/{friends}", each)], each


def _times_as_many(rng: random.Random, name: str, other: str, item: str) -> Problem | None:
    multiple = rng.choice(list(_MULTIPLES))
    first = rng.randint(5, 150)
    second = first * multiple
    fewer = rng.randint(1, second - 1)
    third = second - fewer
    pair = first + second
    story = (f"{name} has {first} {item}. {other} has {_MULTIPLES[multiple]} as many {item} as {name}. Kim has "
             f"{fewer} fewer {item} than {other}. How many {item} do the three of them have together?")
    steps = [(f"{first}*{multiple}", second), (f"{second}-{fewer}", third), (f"{first}+{second}", pair),
             (f"{pair}+{third}", pair + third)]
    return story, steps, pair + third


def _half_then(rng: random.Random, name: str, other: str, item: str) -> Problem | None:
    start = 2 * rng.randint(10, 300)
    half = start // 2
    bought = rng.randint(5, 200)
    kept = half + bought
    lost = rng.randint(1, kept - 1)
    left = kept - lost
    story = (f"{name} had {start} {item} and gave half of them to {other}. Then {name} bought {bought} more and "
             f"lost {lost}. How many {item} does {name} have now?")
    return story, [(f"{start}/2", half), (f"{half}+{bought}", kept), (f"{kept}-{lost}", left)], left


def _earn_spend_split(rng: random.Random, name: str, other: str, item: str) -> Problem | None:
    rate, days, envelopes = rng.randint(3, 40), rng.randint(2, 20), rng.randint(2, 8)
    earned = rate * days
    each = rng.randint(1, max(1, earned // envelopes - 1))
    spent = earned - each * envelopes
    if spent <= 0:
        return None
    rest = earned - spent
    story = (f"{name} earns {rate} dollars a day for {days} days and spends {spent} dollars on {item}. {name} splits "
             f"the rest equally into {envelopes} envelopes. How many dollars go in each envelope?")
    return story, [(f"{rate}*{days}", earned), (f"{earned}-{spent}", rest), (f"{rest}/{envelopes}", each)], each


TEMPLATES: tuple[Callable[[random.Random, str, str, str], Problem | None], ...] = (
    _shared_equally, _times_as_many, _half_then, _earn_spend_split,
)


def split_of(template: str, numbers: tuple[int, ...]) -> str:
    digest = hashlib.sha256(f"{template}:{numbers}".encode()).digest()
    return "test" if digest[0] % TEST_FRACTION_MOD == 0 else "train"


def annotated_answer(steps: list[tuple[str, int]], answer: int) -> str:
    return "\n".join(f"<<{expression}={value}>>" for expression, value in steps) + f"\n#### {answer}"


def plain_answer(answer: str) -> str:
    """Tools off: `<<EXPR=RESULT>>` → `EXPR=RESULT` (the model writes the result itself)."""
    return re.sub(r"<<([^<>]*)>>", r"\1", answer)


def _numbers(story: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", story))


# Generation draws stories until `count` distinct ones are found; the space of (template, numbers) is far larger than
# this, but a bound keeps a typo (max_samples=10**9) an error instead of an hour of drawing.
MAX_COUNT = 1_000_000


def generate(split: str, count: int, seed: int, source: str, reward: str | None) -> list[Example]:
    """`count` distinct problems of `split` (calculator-annotated answers), deterministic in (split, seed)."""
    assert split in SPLITS and count >= 0
    if count > MAX_COUNT:
        raise UserError(
            f"{source}: max_samples={count} asks for more distinct problems than word_problems generates per split "
            f"({MAX_COUNT:,}); lower max_samples (use repeat to see problems more than once)"
        )
    rng = random.Random(f"{NAME}/{split}/{seed}")
    seen: set[tuple[str, tuple[int, ...]]] = set()
    examples = []
    while len(examples) < count:
        template = rng.choice(TEMPLATES)
        name, other = rng.sample(_NAMES, 2)
        item = rng.choice(_ITEMS)
        problem = template(rng, name, other, item)
        if problem is None:
            continue
        story, steps, answer = problem
        key = (template.__name__, _numbers(story))
        if key in seen or split_of(*key) != split:
            continue
        if any(not 0 <= v <= MAX_QUANTITY for v in key[1] + tuple(v for _, v in steps)):
            continue
        seen.add(key)
        sentences = story.split(". ")
        used = set(key[1]) | {v for _, v in steps} | {int(n) for e, _ in steps for n in re.findall(r"\d+", e)}
        for _ in range(rng.randint(1, 2)):  # distractors go anywhere before the question
            x = rng.choice([n for n in range(2, 100) if n not in used])  # a number the work never uses
            distractor = rng.choice(_DISTRACTORS).format(name=name, x=x, item=item)
            sentences.insert(rng.randint(0, len(sentences) - 1), distractor.rstrip("."))
        question = ". ".join(sentences)
        messages = ({"role": "user", "content": question},
                    {"role": "assistant", "content": annotated_answer(steps, answer)})
        examples.append(Example(messages=messages, reference=str(answer), reward=reward or REWARD, source=source))
    return examples


def without_tools(example: Example) -> Example:
    """The same problem with a plain worked answer (data.tools without the calculator)."""
    user, assistant = example.messages
    plain = {"role": "assistant", "content": plain_answer(assistant["content"])}
    return Example(messages=(user, plain), reference=example.reference, reward=example.reward, source=example.source)
