"""Metrics: `run_dir/metrics.jsonl` (one JSON object per line), optional wandb, and a live progress bar.

Only the main rank writes; other ranks get a logger whose methods do nothing, so callers never branch on rank.
Each line is `{"stage": ..., "step": ..., **values}` and is flushed immediately, so a killed run loses nothing
already logged; on resume `truncate_after(step)` drops the lines past the checkpoint so that the continued run
appends without duplicates.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import uuid
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def _jsonable(value: Any) -> Any:
    """Plain floats/ints for JSON; tensors become numbers and non-finite floats become strings (valid JSON)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(run_dir: Path, stage: str | None = None) -> list[dict[str, Any]]:
    """All metric lines (optionally of one stage), in file order."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = [row for _, row in _parsed_lines(path)]
    return [r for r in rows if stage is None or r.get("stage") == stage]


def _parsed_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, row) of every readable line; a line a crash tore (unparsable) is skipped with a warning, never fatal."""
    parsed, torn = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            torn += 1
            continue
        if isinstance(row, dict):
            parsed.append((line, row))
        else:
            torn += 1
    if torn:
        logger.warning("%s: skipped %d unreadable line(s) (a crash mid-write leaves a torn last line)", path, torn)
    return parsed


def drop_torn_tail(path: Path) -> None:
    """Cut a last line without its newline (a write a crash interrupted), so appends start on a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    logger.warning("%s: dropping a torn last line (%d bytes) left by an interrupted write", path, len(data) - keep)
    with open(path, "r+b") as handle:
        handle.truncate(keep)


class MetricsLogger:
    def __init__(
        self,
        run_dir: Path,
        stage: str,
        is_main: bool,
        use_wandb: bool,
        wandb_project: str,
        experiment_name: str,
        config_dict: dict[str, Any],
    ) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.stage = stage
        self.is_main = is_main
        self._file = None
        self._wandb_run = None
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        drop_torn_tail(self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        if use_wandb:
            self._wandb_run = _start_wandb(Path(run_dir), stage, wandb_project, experiment_name, config_dict)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.is_main:
            return
        assert self._file is not None, "log() after close()"
        row = {"stage": self.stage, "step": int(step), **{k: _jsonable(v) for k, v in values.items()}}
        try:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                from integration_training.errors import UserError

                raise UserError(f"{self.path}: no space left on device while logging metrics; free space (or move "
                                "output.save_dir), then --resume from the last checkpoint") from None
            raise
        if self._wandb_run is not None:
            # "sft/loss", "rl/eval/pass@1_strict"; the evaluation stage's "eval/pass@1_strict" keeps its name.
            numeric = {k if k.startswith(f"{self.stage}/") else f"{self.stage}/{k}": v for k, v in row.items()
                       if isinstance(v, (int, float)) and k != "step"}
            self._wandb_run.log(numeric)

    def truncate_after(self, step: int) -> None:
        """Drop this stage's lines with a step greater than `step` (atomic rewrite)."""
        if not self.is_main:
            return
        assert self._file is not None
        lines = _parsed_lines(self.path)
        kept = [line for line, row in lines
                if not (row.get("stage") == self.stage and isinstance(row.get("step"), int) and row["step"] > step)]
        raw = sum(1 for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip())
        if len(kept) == raw:
            return  # nothing to drop (no later step, no unreadable line): the file stays as it is, and open
        self._file.close()
        staging = self.path.with_name(self.path.name + ".tmp")
        staging.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(staging, self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _start_wandb(run_dir: Path, stage: str, project: str, experiment_name: str, config_dict: dict[str, Any]):
    """One wandb run per (run directory, stage); its id is kept in the run directory so a resume continues it."""
    import wandb

    id_file = run_dir / f"wandb_{stage}_id.txt"
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
    return wandb.init(
        project=project,
        name=f"{experiment_name}-{stage}",
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        config=config_dict,
        reinit="create_new",
    )


class Progress:
    """A tqdm bar over optimizer steps (ETA from tqdm's rate), shown on the main rank only."""

    def __init__(self, total: int, initial: int, is_main: bool, description: str) -> None:
        from integration_training.console import phase_bar

        self._bar = phase_bar(total, description, "steps", is_main, initial=initial)

    def update(self, postfix: dict[str, str]) -> None:
        if self._bar is not None:
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
