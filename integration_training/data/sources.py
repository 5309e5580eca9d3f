"""Where rows come from (hub, local jsonl/json/parquet, procedural) and which adapter turns them into Examples."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from integration_training.config import DatasetSpec
from integration_training.data import arc, arithmetic, custom_json, gsm8k, messages, smoltalk, spelling, word_problems
from integration_training.data.types import (
    MAX_JSON_DEPTH,
    Example,
    RowError,
    _bracket_depth,
    loads_row,
    numbered_lines,
)
from integration_training.errors import UserError

Adapter = Callable[[Mapping[str, Any], str, "str | None"], Example]
Generator = Callable[[str, int, int, str, "str | None"], list[Example]]

ROW_ADAPTERS: dict[str, Adapter] = {
    gsm8k.NAME: gsm8k.to_example,
    arc.NAME: arc.to_example,
    smoltalk.NAME: smoltalk.to_example,
}
PROCEDURAL: dict[str, Generator] = {arithmetic.NAME: arithmetic.generate, spelling.NAME: spelling.generate,
                                    word_problems.NAME: word_problems.generate}
SUPPORTED_NAMES = (*ROW_ADAPTERS, custom_json.NAME, *PROCEDURAL)
LOCAL_EXTENSIONS = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class SourceCount:
    """Rows of one source: in the source, after the `max_samples` sample, after `repeat`."""

    source: str
    available: int
    sampled: int
    after_repeat: int


def source_label(spec: DatasetSpec) -> str:
    """A readable, stable label such as "openai/gsm8k:main/train" or "custom_json(identity.jsonl)/train"."""
    name = f"{spec.name}({Path(spec.path).name})" if spec.name == custom_json.NAME and spec.path else spec.name
    return f"{name}{':' + spec.subset if spec.subset else ''}/{spec.split}"


def supported_names_message() -> str:
    return (
        f"supported names: {', '.join(SUPPORTED_NAMES)}, or any Hugging Face hub dataset id ('owner/name') "
        "whose rows have a 'messages' column"
    )


def adapter_for(name: str) -> Adapter:
    import difflib

    if name in ROW_ADAPTERS:
        return ROW_ADAPTERS[name]
    # A near miss of a supported name is a typo, not another hub dataset (which would fail later, after a download
    # attempt, or worse, succeed with the generic chat adapter on the wrong data).
    close = difflib.get_close_matches(name, SUPPORTED_NAMES, n=1, cutoff=0.85)
    if close and close[0].casefold() != name.casefold() or name.casefold() in (n.casefold() for n in ROW_ADAPTERS):
        suggestion = close[0] if close else name
        raise UserError(f"data: unknown dataset name {name!r}; did you mean {suggestion!r}? {supported_names_message()}")
    if "/" in name and not name.startswith(("/", ".", "~")):
        return messages.to_example  # a generic hub chat dataset; the adapter checks the column exists
    raise UserError(f"data: unknown dataset name {name!r}; {supported_names_message()}")


# ---------------------------------------------------------------- reading rows, each with where it came from


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    for number, line in numbered_lines(path):
        if not line.strip():
            continue
        try:
            row = loads_row(line)
        except RowError as error:
            raise UserError(f"{path}:{number}: {error}; fix or remove this line") from None
        yield f"{path}:{number}", row


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    text = "\n".join(line for _, line in numbered_lines(path))
    try:
        if _bracket_depth(text) > MAX_JSON_DEPTH:
            raise UserError(f"{path}: JSON nested more than {MAX_JSON_DEPTH} levels deep; a row is a list of messages")
        value = json.loads(text)
    except (RecursionError, ValueError) as error:
        if not isinstance(error, json.JSONDecodeError):
            raise UserError(f"{path}: unreadable JSON ({type(error).__name__}); fix the file") from None
        # HF's `to_json` writes JSON Lines even with a .json suffix; accept that form too.
        if error.msg == "Extra data":
            yield from _jsonl_rows(path)
            return
        raise UserError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise UserError(f"{path}: expected a JSON list of rows (or JSON Lines)")
    for index, row in enumerate(value):
        yield f"{path} row {index}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq  # a dependency of `datasets`; imported here to keep module import cheap

    for index, row in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path} row {index}", row


def local_files(spec: DatasetSpec) -> list[Path]:
    """The files a local `path` names: the file itself, or a directory's `{split}.*` / `{split}-*.*` files."""
    assert spec.path is not None
    root = Path(spec.path).expanduser()
    if not root.exists():
        raise UserError(f"data: local path {spec.path} for dataset {spec.name!r} does not exist; fix DatasetSpec.path")
    if root.is_file():
        if root.suffix not in LOCAL_EXTENSIONS:
            raise UserError(f"data: {root} is not a {'/'.join(LOCAL_EXTENSIONS)} file")
        return [root]
    folders = [root / spec.subset, root / spec.subset / "data"] if spec.subset else []
    folders += [root, root / "data"]
    for folder in folders:
        found = sorted(
            f for f in folder.glob("*") if f.suffix in LOCAL_EXTENSIONS
            and (f.stem == spec.split or f.stem.startswith(spec.split + "-"))
        ) if folder.is_dir() else []
        if found:
            return found
    raise UserError(
        f"data: directory {root} has no {spec.split}{{{','.join(LOCAL_EXTENSIONS)}}} file (looked in "
        f"{', '.join(str(f) for f in folders)}); point DatasetSpec.path at the file"
    )


def local_rows(spec: DatasetSpec) -> Iterator[tuple[str, Any]]:
    readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".parquet": _parquet_rows}
    for file in local_files(spec):
        yield from readers[file.suffix](file)


def hub_rows(spec: DatasetSpec) -> Iterator[tuple[str, Any]]:
    import datasets  # heavy; only needed for hub sources

    try:
        table = datasets.load_dataset(spec.name, spec.subset, split=spec.split)
    except Exception as error:  # network, missing subset/split, gated repo...: all fixable by the user
        raise UserError(
            f"data: could not load hub dataset {spec.name!r} (subset={spec.subset!r}, split={spec.split!r}): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}; check the name, subset "
            "and split, or download it and set DatasetSpec.path"
        ) from None
    for index, row in enumerate(table):
        yield f"{spec.name} {spec.split} row {index}", row


# ---------------------------------------------------------------- Examples


def load_all(spec: DatasetSpec, seed: int, tools: Sequence[str] = ()) -> list[Example]:
    """Every Example of a non-procedural source, or `max_samples` generated ones of a procedural source.

    `tools` is `data.tools`: with the calculator on, GSM8K keeps its `<<EXPR=RESULT>>` annotations."""
    label = source_label(spec)
    if spec.name in PROCEDURAL:
        if spec.path is not None:
            raise UserError(f"data: {spec.name!r} is generated procedurally; set path=None")
        if spec.split not in ("train", "test"):
            raise UserError(f"data: {spec.name!r} has splits 'train' and 'test', not {spec.split!r}")
        if spec.max_samples is None:
            raise UserError(f"data: {spec.name!r} is procedural and unbounded; set max_samples to how many rows")
        generated = PROCEDURAL[spec.name](spec.split, spec.max_samples, seed, label, spec.reward)
        if spec.name == word_problems.NAME and "calculator" not in tools:
            return [word_problems.without_tools(e) for e in generated]  # plain `EXPR=RESULT` lines
        return generated
    if spec.name == custom_json.NAME:
        if spec.path is None:
            raise UserError("data: custom_json needs DatasetSpec.path pointing at a JSONL file")
        return custom_json.load_file(Path(spec.path).expanduser(), label, spec.reward)
    adapter = adapter_for(spec.name)
    if "calculator" in tools and spec.name == gsm8k.NAME:
        adapter = gsm8k.to_example_with_calculator
    examples = []
    for where, row in (hub_rows(spec) if spec.path is None else local_rows(spec)):
        if not isinstance(row, Mapping):
            raise UserError(f"{where}: a row must be an object with the {spec.name} fields")
        try:
            examples.append(adapter(row, label, spec.reward))
        except RowError as error:
            raise UserError(f"{where}: {error} (dataset {spec.name!r})") from None
    if not examples:
        raise UserError(f"data: {label} has no rows")
    return examples


def sample_and_repeat(
    examples: list[Example], max_samples: int | None, repeat: int, seed: int, label: str
) -> list[Example]:
    """A seeded sample of `max_samples` rows (not the first N), each repeated `repeat` times."""
    assert repeat >= 1, "DatasetSpec.repeat is validated >= 1 by config"
    if max_samples is not None and max_samples < len(examples):
        rng = random.Random(f"sample/{seed}/{label}")
        chosen = sorted(rng.sample(range(len(examples)), max_samples))  # sorted: keep source order readable
        examples = [examples[i] for i in chosen]
    return examples * repeat


def load_source_counted(spec: DatasetSpec, seed: int, tools: Sequence[str] = ()) -> tuple[list[Example], SourceCount]:
    label = source_label(spec)
    everything = load_all(spec, seed, tools)
    selected = sample_and_repeat(everything, spec.max_samples, spec.repeat, seed, label)
    sampled = len(selected) // spec.repeat
    assert sampled == min(len(everything), spec.max_samples or len(everything))
    return selected, SourceCount(label, len(everything), sampled, len(selected))


def load_source(spec: DatasetSpec, seed: int) -> list[Example]:
    """The Examples one DatasetSpec contributes: seeded `max_samples` sample × `repeat`, in source order."""
    return load_source_counted(spec, seed)[0]
