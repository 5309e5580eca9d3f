"""The SFT data stream: which conversations form each sequence (row) of each optimizer step.

Rows of one epoch: with packing, the best-fit-decreasing rows of the conversation lengths (`packing.py`). The
rows' length profile depends only on the multiset of lengths, so it is computed once; epoch e then assigns the
conversations to those rows with equal-length conversations permuted by a generator seeded with (seed, e) and
orders the rows by a second seeded permutation. Without packing, a row is one conversation and epoch e is one
seeded permutation. Either way an epoch has the same number of rows R, computed once.

Steps read the epochs back to back as one stream of rows: step s holds global rows [s·S, (s+1)·S) (S =
sequences per step), global row g is row g mod R of epoch g div R. So the tail of an epoch that does not fill a
step is carried into the next step together with the next epoch's first rows (never dropped); only after the
last epoch a partial step (< S rows) is left untrained, and `partial_rows` says how many rows that is.

Cost: preparing an epoch is two seeded permutations and one argsort, O(n log n) in numpy, cached for the two
most recent epochs (a step can span an epoch boundary); step → rows is O(1) arithmetic; nothing of earlier
epochs is recomputed, so step time does not grow with the epoch.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from integration_training.data.packing import best_fit_decreasing_rows
from integration_training.template import Rendered


def _generator(seed: int, epoch: int, purpose: str) -> np.random.Generator:
    """A numpy generator that is a pure function of (seed, epoch, purpose), the same on every platform."""
    digest = hashlib.sha256(f"sft/{seed}/{epoch}/{purpose}".encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


@dataclass(frozen=True)
class _Epoch:
    row_order: np.ndarray  # position p of the epoch holds row row_order[p]
    conversation_at_rank: np.ndarray  # packing: rank → conversation index; no packing: position → conversation


class SFTStream:
    """Step-indexed access to the training sequences; see the module docstring for the order."""

    def __init__(self, rendered: Sequence[Rendered], seed: int, packing: bool, max_length: int,
                 sequences_per_step: int) -> None:
        assert sequences_per_step > 0 and max_length > 0
        self.rendered = rendered
        self.seed = seed
        self.packing = packing
        self.max_length = max_length
        self.sequences_per_step = sequences_per_step
        lengths = getattr(rendered, "lengths", None)
        self.lengths = np.asarray(lengths if lengths is not None else [len(r) for r in rendered], dtype=np.int64)
        assert len(self.lengths) == len(rendered)
        if packing and len(self.lengths):
            row_of_rank, sorted_lengths = best_fit_decreasing_rows(self.lengths, max_length)
            # CSR over rows: the ranks of row r are members[starts[r]:starts[r + 1]] (longest first).
            self._members = np.argsort(row_of_rank, kind="stable")
            self._starts = np.searchsorted(row_of_rank[self._members], np.arange(int(row_of_rank.max()) + 2))
            self._sorted_lengths = sorted_lengths
            self.rows_per_epoch = len(self._starts) - 1
        else:
            self.rows_per_epoch = len(self.lengths)
        self._epochs: OrderedDict[int, _Epoch] = OrderedDict()

    # ------------------------------------------------------------------------------------------ epochs

    def _epoch(self, epoch: int) -> _Epoch:
        assert epoch >= 0
        if epoch not in self._epochs:
            n = len(self.lengths)
            if self.packing:
                ties = _generator(self.seed, epoch, "ties").permutation(n)
                # Sort by length (longest first), equal lengths in this epoch's random order.
                conversations = np.lexsort((ties, -self.lengths))
            else:
                conversations = _generator(self.seed, epoch, "order").permutation(n)
            rows = _generator(self.seed, epoch, "rows").permutation(self.rows_per_epoch)
            self._epochs[epoch] = _Epoch(row_order=rows, conversation_at_rank=conversations)
            while len(self._epochs) > 2:  # a step spans at most two epochs' rows... or many tiny ones
                self._epochs.popitem(last=False)
        else:
            self._epochs.move_to_end(epoch)
        return self._epochs[epoch]

    def _row_conversations(self, epoch: int, position: int) -> np.ndarray:
        data = self._epoch(epoch)
        row = int(data.row_order[position])
        if not self.packing:
            return data.conversation_at_rank[row : row + 1]
        ranks = self._members[self._starts[row] : self._starts[row + 1]]
        return data.conversation_at_rank[ranks]

    def epoch_conversations(self, epoch: int) -> list[list[int]]:
        """Every row of `epoch` in order, as conversation indices (tests and the plan; O(n))."""
        return [self._row_conversations(epoch, p).tolist() for p in range(self.rows_per_epoch)]

    def rows(self, epoch: int) -> list[list[Rendered]]:
        """Every row of `epoch` in order, as conversations (tests and the plan; O(n))."""
        return [[self.rendered[i] for i in row] for row in self.epoch_conversations(epoch)]

    # ------------------------------------------------------------------------------------------ steps

    def _first_step_of_epoch(self, epoch: int) -> int:
        """The first step whose first row lies in `epoch` (ceil(epoch · R / S))."""
        return -(-epoch * self.rows_per_epoch // self.sequences_per_step)

    def steps_in_epoch(self, epoch: int) -> int:
        """Steps whose first row lies in `epoch` (the last one may end in the next epoch)."""
        return self._first_step_of_epoch(epoch + 1) - self._first_step_of_epoch(epoch)

    def steps_for_epochs(self, epochs: int) -> int:
        """Whole steps in `epochs` epochs of rows; the rest (`partial_rows`) is left untrained."""
        return epochs * self.rows_per_epoch // self.sequences_per_step

    def partial_rows(self, epochs: int) -> int:
        return epochs * self.rows_per_epoch % self.sequences_per_step

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch of the step's first row, index of the step among the steps starting in that epoch); O(1)."""
        assert step >= 0 and self.rows_per_epoch > 0
        epoch = step * self.sequences_per_step // self.rows_per_epoch
        return epoch, step - self._first_step_of_epoch(epoch)

    def step_conversations(self, step: int) -> list[list[int]]:
        """The step's rows as conversation indices."""
        assert self.rows_per_epoch > 0
        first = step * self.sequences_per_step
        rows = []
        for g in range(first, first + self.sequences_per_step):
            epoch, position = divmod(g, self.rows_per_epoch)
            rows.append(self._row_conversations(epoch, position).tolist())
        return rows

    def step_sequences(self, step: int) -> list[list[Rendered]]:
        return [[self.rendered[i] for i in row] for row in self.step_conversations(step)]
