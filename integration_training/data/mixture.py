"""A mixture: all sources' Examples, sampled, repeated and shuffled together deterministically."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from integration_training.config import DatasetSpec
from integration_training.data.sources import SourceCount, load_source_counted
from integration_training.data.types import Example


@dataclass(frozen=True)
class MixtureReport:
    sources: tuple[SourceCount, ...]

    @property
    def total(self) -> int:
        return sum(s.after_repeat for s in self.sources)

    def lines(self) -> list[str]:
        """Human-readable rows for the plan: one per source plus a total."""
        width = max([len(s.source) for s in self.sources] + [6])
        out = [f"{'source':<{width}}  {'available':>9}  {'sampled':>7}  {'x repeat':>8}"]
        for s in self.sources:
            out.append(f"{s.source:<{width}}  {s.available:>9}  {s.sampled:>7}  {s.after_repeat:>8}")
        out.append(f"{'total':<{width}}  {'':>9}  {'':>7}  {self.total:>8}")
        return out


@dataclass(frozen=True)
class Mixture:
    examples: list[Example]
    report: MixtureReport


def shuffle_interleaved(groups: Sequence[list[Example]], seed: int) -> list[Example]:
    """One seeded permutation of all sources together, so every stretch of training mixes every source."""
    combined = [example for group in groups for example in group]
    random.Random(f"mixture/{seed}").shuffle(combined)
    return combined


def build_mixture(specs: Sequence[DatasetSpec], seed: int, tools: Sequence[str] = ()) -> Mixture:
    """`tools` is `data.tools` (sources that carry tool annotations keep them when the tool is on)."""
    groups, counts = [], []
    for spec in specs:
        examples, count = load_source_counted(spec, seed, tools)
        groups.append(examples)
        counts.append(count)
    examples = shuffle_interleaved(groups, seed)
    report = MixtureReport(tuple(counts))
    assert len(examples) == report.total
    return Mixture(examples=examples, report=report)
