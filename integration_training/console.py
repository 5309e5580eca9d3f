"""What a person watching the terminal sees: one tqdm bar per phase, log lines above it, quiet libraries.

- Log records reach the terminal through `TqdmConsoleHandler`, which writes with `tqdm.write`: the line lands above
  the live bar instead of inside it. `train.log` (a plain FileHandler set up by cli) keeps every record.
- Below `log_level="DEBUG"`, transformers', datasets' and huggingface_hub's own progress bars ("Loading weights",
  "Writing model shards", "Map") and their info/warning chatter are switched off, and records from those libraries
  and from Python's `warnings` are kept out of the terminal (they still go to train.log). DEBUG shows everything.
- `phase_bar` is the one bar factory, so every phase shows done/total, rate and ETA the same way.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

# Loggers whose records stay in train.log unless log_level="DEBUG": the libraries' own chatter and Python warnings.
THIRD_PARTY = ("transformers", "datasets", "huggingface_hub", "torch", "accelerate", "urllib3", "filelock", "py.warnings")


class TqdmConsoleHandler(logging.Handler):
    """A stderr handler that prints through `tqdm.write`, so lines appear above any live progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never take the run down; this is logging's own convention
            self.handleError(record)


class _OwnRecordsOnly(logging.Filter):
    """Drop the third-party loggers' records (the console, below DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(record.name == name or record.name.startswith(name + ".") for name in THIRD_PARTY)


def console_handler(log_level: str, is_main: bool) -> logging.Handler:
    """The terminal's handler: short lines, our records only unless DEBUG; other ranks show warnings and up."""
    handler = TqdmConsoleHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    handler.setLevel(log_level if is_main else "WARNING")
    if log_level != "DEBUG":
        handler.addFilter(_OwnRecordsOnly())
    return handler


def quiet_libraries(log_level: str) -> None:
    """Route the libraries' log records through our handlers; below DEBUG switch their progress bars off.

    transformers and datasets print through their own stderr handlers by default, past our console filter and
    never into train.log; with those handlers removed their records (warnings and up) propagate to the root logger:
    train.log gets them all, the terminal only at DEBUG (see `_OwnRecordsOnly`).
    """
    assert log_level in ("DEBUG", "INFO", "WARNING", "ERROR"), log_level
    import datasets
    import huggingface_hub.utils
    import transformers

    logging.captureWarnings(True)  # `warnings.warn` → logger "py.warnings" → train.log (terminal: DEBUG only)
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    library_logger = logging.getLogger("datasets")
    for handler in list(library_logger.handlers):
        library_logger.removeHandler(handler)
    library_logger.propagate = True
    if log_level == "DEBUG":
        return
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()


def phase_bar(total: float, description: str, unit: str, is_main: bool, initial: float = 0) -> Any:
    """A tqdm bar for one phase on the main rank (None elsewhere): `desc: 40%|####  | 80/200 problems [01:02<01:33, 1.3 problems/s]`.

    Counts are shown as integers even when updated by fractions (evaluation advances by decoded tokens).
    """
    if not is_main:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=description,
        unit=unit,
        dynamic_ncols=True,
        file=sys.stderr,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]",
    )


def format_values(values: dict[str, float], digits: int = 4) -> str:
    """`name=value name=value` (4 significant digits), the form every metric is printed in; never a dict."""
    return " ".join(f"{k}={_short(v, digits)}" for k, v in values.items())


def _short(value: Any, digits: int) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)
