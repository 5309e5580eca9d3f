"""Data sources, task adapters and the seeded mixture."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from integration_training.config import DatasetSpec
from integration_training.data import Example, build_mixture, load_source, load_source_counted
from integration_training.data import spelling
from integration_training.errors import UserError

GSM8K_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
IDENTITY = Path(__file__).resolve().parents[1] / "configs" / "data" / "identity.jsonl"


def spec(name: str, split: str = "train", *, subset: str | None = None, max_samples: int | None = None,
         repeat: int = 1, path: str | Path | None = None, reward: str | None = None) -> DatasetSpec:
    return DatasetSpec(name=name, split=split, subset=subset, max_samples=max_samples, repeat=repeat,
                       path=None if path is None else str(path), reward=reward)


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ---------------------------------------------------------------- GSM8K (real data, by path)


@pytest.mark.skipif(not GSM8K_DIR.is_dir(), reason="shared GSM8K copy not present")
def test_gsm8k_train_loads_all_rows_clean() -> None:
    examples = load_source(spec("openai/gsm8k", subset="main", path=GSM8K_DIR / "train.jsonl"), seed=0)
    assert len(examples) == 7473
    for ex in examples:
        user, assistant = ex.messages
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert "<<" not in assistant["content"] and ">>" not in assistant["content"]
        final = re.search(r"#### (\S+)$", assistant["content"])
        assert final is not None, assistant["content"]
        assert ex.reference == final.group(1).replace(",", "") and "," not in ex.reference
        assert ex.reward == "gsm8k" and ex.source == "openai/gsm8k:main/train"
    # The first row against the raw file, annotations stripped independently (no GSM8K text is kept in the repo).
    raw = json.loads((GSM8K_DIR / "train.jsonl").read_text().splitlines()[0])
    expected = re.sub(r"<<[^>]*>>", "", raw["answer"]).strip()
    assert "<<" in raw["answer"] and examples[0].messages[1]["content"] == expected
    assert examples[0].messages[0]["content"] == raw["question"].strip()


@pytest.mark.skipif(not GSM8K_DIR.is_dir(), reason="shared GSM8K copy not present")
def test_gsm8k_test_split_from_directory_and_custom_reward() -> None:
    examples = load_source(spec("openai/gsm8k", "test", subset="main", path=GSM8K_DIR, reward="mymod:score"), 0)
    assert len(examples) == 1319
    assert {ex.reward for ex in examples} == {"mymod:score"}


def test_gsm8k_commas_stripped_and_missing_answer_is_user_error(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "a <<1000+234=1234>>1,234\n#### 1,234"}])
    (ex,) = load_source(spec("openai/gsm8k", path=good), 0)
    assert ex.reference == "1234" and ex.messages[1]["content"] == "a 1,234\n#### 1,234"
    bad = write_jsonl(tmp_path / "b.jsonl", [{"question": "q", "answer": "#### 1"}, {"question": "q", "answer": "7"}])
    with pytest.raises(UserError, match=re.escape(f"{bad}:2")):
        load_source(spec("openai/gsm8k", path=bad), 0)


# ---------------------------------------------------------------- ARC, SmolTalk, generic messages (fixtures)

ARC_ROWS = [
    {"id": "q1", "question": "Which is a planet?",
     "choices": {"text": ["Sun", "Mars", "Moon", "Comet"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
    {"id": "q2", "question": "What do plants need?",
     "choices": {"text": ["Light", "Sand", "Glass"], "label": ["1", "2", "3"]}, "answerKey": "1"},
]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_arc_adapter(tmp_path: Path, fmt: str) -> None:
    root = tmp_path / "ai2_arc"
    file = root / "ARC-Easy" / f"train.{fmt}"
    (write_jsonl if fmt == "jsonl" else write_parquet)(file, ARC_ROWS)
    for path in (file, root):  # a file, or a hub-export directory resolved through subset/split
        first, second = load_source(spec("allenai/ai2_arc", subset="ARC-Easy", path=path), 0)
        assert first.reference == "B" and first.messages[1] == {"role": "assistant", "content": "B"}
        prompt = first.messages[0]["content"]
        assert prompt.startswith("Which is a planet?") and "A. Sun\nB. Mars\nC. Moon\nD. Comet" in prompt
        assert "letter" in prompt
        # numeric labels are mapped onto letters, answer included
        assert second.reference == "A" and "A. Light\nB. Sand\nC. Glass" in second.messages[0]["content"]
        assert first.reward == "arc" and first.source == "allenai/ai2_arc:ARC-Easy/train"


def test_arc_bad_answer_key_names_row(tmp_path: Path) -> None:
    bad = dict(ARC_ROWS[0], answerKey="E")
    file = write_parquet(tmp_path / "train.parquet", [ARC_ROWS[0], bad])
    with pytest.raises(UserError, match=re.escape(f"{file} row 1")):
        load_source(spec("allenai/ai2_arc", subset="ARC-Easy", path=file), 0)


SMOLTALK_ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}], "source": "x"},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}], "source": "y"},
]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_smoltalk_and_generic_messages(tmp_path: Path, fmt: str) -> None:
    file = (write_jsonl if fmt == "jsonl" else write_parquet)(tmp_path / f"train.{fmt}", SMOLTALK_ROWS)
    for name in ("HuggingFaceTB/smol-smoltalk", "someone/chat-data"):
        first, second = load_source(spec(name, path=file), 0)
        assert first.messages[0] == {"role": "system", "content": "Be brief."}
        assert len(second.messages) == 4 and second.messages[-1]["content"] == "6"
        assert first.reference is None and first.reward is None


def test_generic_dataset_without_messages_column(tmp_path: Path) -> None:
    file = write_jsonl(tmp_path / "train.jsonl", [{"text": "hi"}])
    with pytest.raises(UserError, match=r"messages"):
        load_source(spec("someone/plain-text", path=file), 0)


# ---------------------------------------------------------------- custom_json


def test_shipped_identity_file() -> None:
    examples = load_source(spec("custom_json", path=IDENTITY), 0)
    assert 25 <= len(examples) <= 40
    assert all("SmolLM2" in " ".join(m["content"] for m in ex.messages) for ex in examples[:3])
    assert not any("####" in m["content"] and "clips" in m["content"] for ex in examples for m in ex.messages)
    assert len({ex.messages[-2]["content"] for ex in examples}) == len(examples)  # varied user phrasings


def test_custom_json_forms_and_reference(tmp_path: Path) -> None:
    file = tmp_path / "c.jsonl"
    file.write_text(
        json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) + "\n\n"
        + json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "1+1"},
                                   {"role": "assistant", "content": "#### 2"}], "reference": "2"}) + "\n"
    )
    first, second = load_source(spec("custom_json", path=file, reward="mymod:fn"), 0)
    assert first.reference is None and second.reference == "2" and second.reward == "mymod:fn"
    assert first.source == "custom_json(c.jsonl)/train"


@pytest.mark.parametrize("line", [
    "{not json",
    json.dumps([{"role": "user", "content": "a"}]),  # last is not assistant
    json.dumps([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),  # no alternation
    json.dumps([{"role": "assistant", "content": "a"}]),
    json.dumps([{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]),
    json.dumps({"conversation": []}),
])
def test_custom_json_malformed_line_names_file_and_line(tmp_path: Path, line: str) -> None:
    good = json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    file = tmp_path / "bad.jsonl"
    file.write_text(f"{good}\n{good}\n{line}\n")
    with pytest.raises(UserError, match=re.escape(f"{file}:3")):
        load_source(spec("custom_json", path=file), 0)


# ---------------------------------------------------------------- procedural


def test_arithmetic_format_and_train_test_never_overlap() -> None:
    train = load_source(spec("arithmetic", max_samples=3000), seed=0)
    test = load_source(spec("arithmetic", "test", max_samples=800), seed=0)
    other_seed_test = load_source(spec("arithmetic", "test", max_samples=800), seed=1)

    def triple(ex: Example) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", ex.messages[0]["content"]))

    train_triples = {triple(ex) for ex in train}
    assert len(train_triples) == 3000  # distinct within a split
    assert not train_triples & {triple(ex) for ex in test + other_seed_test}
    for ex in train[:200] + test[:200]:
        a, b, c = triple(ex)
        assert ex.reference == str(a + b - c) and int(ex.reference) >= 0
        assert ex.messages[1]["content"] == f"{a}+{b}={a + b}\n{a + b}-{c}={a + b - c}\n#### {a + b - c}"
        assert 2 <= a <= 49 and 2 <= b <= 49 and 1 <= c <= a + b
        assert ex.reward == "arithmetic"


def test_arithmetic_is_deterministic_and_seeded() -> None:
    s = spec("arithmetic", max_samples=20)
    assert load_source(s, 3) == load_source(s, 3)
    assert load_source(s, 3) != load_source(s, 4)


def test_spelling_format_and_disjoint_words() -> None:
    train_words, test_words = set(spelling.words_for("train")), set(spelling.words_for("test"))
    assert not train_words & test_words and len(test_words) >= 20
    for split, words in (("train", train_words), ("test", test_words)):
        examples = load_source(spec("spelling", split, max_samples=200), seed=0)
        kinds = Counter()
        for ex in examples:
            answer = ex.messages[1]["content"]
            assert answer.endswith(f"\n#### {ex.reference}") and ex.reward == "spelling"
            spelled = re.search(r"([a-z](?:-[a-z])+)", answer).group(1)
            assert spelled.replace("-", "") in words
            if ex.reference.isdigit():  # count task: the reference is the true count
                kinds["count"] += 1
                letter = re.search(r"The letter ([a-z])", answer).group(1)
                assert int(ex.reference) == spelled.split("-").count(letter)
            else:
                kinds["spell"] += 1
                assert ex.reference == spelled
        assert kinds["count"] > 20 and kinds["spell"] > 20


@pytest.mark.parametrize("bad, message", [
    (dict(name="arithmetic", split="validation", max_samples=5), "'train' and 'test'"),
    (dict(name="arithmetic", split="train", max_samples=None), "max_samples"),
    (dict(name="spelling", split="train", max_samples=5, path="x.jsonl"), "path=None"),
])
def test_procedural_bad_specs(bad: dict, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        load_source(spec(**bad), 0)


# ---------------------------------------------------------------- bad names and paths


def test_unknown_name_lists_supported_names() -> None:
    with pytest.raises(UserError) as error:
        load_source(spec("gsm9k"), 0)
    for name in ("openai/gsm8k", "allenai/ai2_arc", "HuggingFaceTB/smol-smoltalk", "custom_json", "spelling",
                 "arithmetic"):
        assert name in str(error.value)


def test_missing_local_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "train.jsonl"
    for name in ("openai/gsm8k", "custom_json"):
        with pytest.raises(UserError, match=re.escape(str(missing))):
            load_source(spec(name, path=missing), 0)


# ---------------------------------------------------------------- mixture


def numbered_source(tmp_path: Path, name: str, count: int) -> Path:
    rows = [[{"role": "user", "content": f"{name} {i}"}, {"role": "assistant", "content": str(i)}] for i in range(count)]
    return write_jsonl(tmp_path / f"{name}.jsonl", rows)


def test_mixture_counts_and_report(tmp_path: Path) -> None:
    a, b = numbered_source(tmp_path, "a", 50), numbered_source(tmp_path, "b", 8)
    specs = [spec("custom_json", path=a, max_samples=10, repeat=3), spec("custom_json", path=b, max_samples=20),
             spec("arithmetic", max_samples=7, repeat=2)]
    mixture = build_mixture(specs, seed=0)
    counts = Counter(ex.source for ex in mixture.examples)
    assert counts == {"custom_json(a.jsonl)/train": 30, "custom_json(b.jsonl)/train": 8, "arithmetic/train": 14}
    rows = [(s.available, s.sampled, s.after_repeat) for s in mixture.report.sources]
    assert rows == [(50, 10, 30), (8, 8, 8), (7, 7, 14)]
    assert mixture.report.total == 52 == len(mixture.examples)
    assert any("after" in line or "repeat" in line for line in mixture.report.lines())
    # each sampled row appears exactly `repeat` times
    assert set(Counter(ex.messages[0]["content"] for ex in mixture.examples if "a.jsonl" in ex.source).values()) == {3}


def test_mixture_seeded_order_and_sample(tmp_path: Path) -> None:
    a, b = numbered_source(tmp_path, "a", 200), numbered_source(tmp_path, "b", 30)
    specs = [spec("custom_json", path=a, max_samples=40), spec("custom_json", path=b)]
    first, again, other = build_mixture(specs, 0), build_mixture(specs, 0), build_mixture(specs, 1)
    assert first.examples == again.examples
    assert first.examples != other.examples
    chosen = sorted(int(ex.messages[1]["content"]) for ex in first.examples if "a.jsonl" in ex.source)
    assert len(chosen) == 40 and chosen != list(range(40))  # a seeded sample, not the first N
    # interleaved: the first 40 examples are not all from one source
    assert len({ex.source for ex in first.examples[:40]}) == 2
    sampled, _ = load_source_counted(specs[0], 0)
    assert [int(ex.messages[1]["content"]) for ex in sampled] == chosen
