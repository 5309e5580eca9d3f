"""spelling: procedural letter-level tasks — spell a word, or count a letter in it.

Answers end with `#### <answer>`: the hyphen-joined letters ("a-p-p-l-e") or the count ("2"). Train and test
use disjoint word sets (a stable hash of the word picks its split), so eval words are never trained on.
"""

from __future__ import annotations

import hashlib
import random

from integration_training.data.types import Example

NAME = "spelling"
REWARD = "spelling"
SPLITS = ("train", "test")

WORDS = tuple(
    """
    apple banana cherry orange grape lemon mango peach pear plum melon berry strawberry raspberry blueberry
    coconut pineapple apricot tomato potato carrot onion garlic pepper cucumber pumpkin spinach lettuce celery
    bread butter cheese yogurt coffee tea water juice sugar honey salt flour rice pasta noodle cookie muffin
    house garden window door kitchen bedroom table chair sofa lamp mirror carpet pillow blanket curtain
    school teacher student pencil notebook paper eraser library lesson science history music painting
    mountain river ocean island forest desert valley meadow canyon glacier volcano beach harbor lagoon
    tiger lion zebra giraffe elephant monkey rabbit turtle dolphin penguin eagle parrot sparrow falcon
    whale shark octopus lobster spider beetle butterfly dragonfly squirrel hedgehog kangaroo koala panda
    yellow purple silver golden crimson scarlet violet magenta turquoise indigo maroon
    computer keyboard monitor printer network server program function variable compiler database
    rocket planet comet galaxy nebula asteroid satellite telescope universe gravity orbit eclipse
    bicycle airplane helicopter submarine tractor scooter wagon train subway ferry canoe sailboat
    doctor nurse farmer baker pilot artist writer singer dancer driver lawyer plumber carpenter
    happiness kindness courage freedom wisdom friendship patience honesty loyalty curiosity
    morning evening midnight weekend holiday birthday summer winter autumn spring yesterday tomorrow
    mississippi committee accommodate occurrence embarrass necessary separate millennium parallel
    bookkeeper balloon coffee address success possess assessment tennessee bubble puzzle
    umbrella elevator escalator calendar envelope sandwich hamburger spaghetti broccoli avocado
    triangle rectangle circle square hexagon pentagon cylinder sphere pyramid diamond
    whisper thunder lightning rainbow blizzard tornado hurricane drizzle breeze sunshine
    journey adventure treasure mystery legend kingdom castle dragon wizard knight princess
    """.split()
)
_SPELL_PROMPTS = (
    "Spell the word \"{w}\" letter by letter.",
    "How do you spell \"{w}\"? Give me each letter.",
    "Please spell out {w}, one letter at a time.",
)
_COUNT_PROMPTS = (
    "How many times does the letter \"{l}\" appear in the word \"{w}\"?",
    "Count the letter {l} in \"{w}\".",
    "How many {l}'s are in {w}?",
)


def split_of(word: str) -> str:
    return "test" if hashlib.sha256(word.encode()).digest()[0] % 4 == 0 else "train"


def words_for(split: str) -> tuple[str, ...]:
    assert split in SPLITS
    # dict.fromkeys keeps the first occurrence: the shipped list has a few repeats and order must be stable.
    return tuple(w for w in dict.fromkeys(WORDS) if split_of(w) == split)


def spell_example(rng: random.Random, word: str) -> tuple[str, str, str]:
    spelled = "-".join(word)
    question = rng.choice(_SPELL_PROMPTS).format(w=word)
    return question, f"{word} is spelled {spelled}.\n#### {spelled}", spelled


def count_example(rng: random.Random, word: str) -> tuple[str, str, str]:
    # Half the time ask about a letter that is absent, so "0" is a real answer and not a giveaway.
    letter = rng.choice(word) if rng.random() < 0.5 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    positions = [str(i + 1) for i, ch in enumerate(word) if ch == letter]
    count = len(positions)
    where = f"at position{'s' if count > 1 else ''} {', '.join(positions)}" if positions else "nowhere"
    question = rng.choice(_COUNT_PROMPTS).format(l=letter, w=word)
    answer = f"Spelled out: {'-'.join(word)}.\nThe letter {letter} appears {where}, so the count is {count}.\n#### {count}"
    return question, answer, str(count)


def generate(split: str, count: int, seed: int, source: str, reward: str | None) -> list[Example]:
    """`count` tasks drawn from `split`'s words, deterministic in (split, seed); repeats are possible."""
    words = words_for(split)
    assert words, "each split needs words"
    rng = random.Random(f"spelling/{split}/{seed}")
    examples = []
    for _ in range(count):
        word = rng.choice(words)
        maker = spell_example if rng.random() < 0.5 else count_example
        question, answer, reference = maker(rng, word)
        messages = ({"role": "user", "content": question}, {"role": "assistant", "content": answer})
        examples.append(Example(messages=messages, reference=reference, reward=reward or REWARD, source=source))
    return examples
