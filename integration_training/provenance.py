"""The reproducibility record `{run_dir}/environment.json` and the check that a resume sees the same data.

Written by the main process when a stage starts fresh: project version and git commit, Python / torch /
transformers / datasets / CUDA versions, device names, the seed, the fixed template date, and per stage the
fingerprints of what it trains on (sha256 of the rows actually used, per source; tokenizer; chat template).
`--resume` compares the stage's fingerprints with the recorded ones and refuses (UserError → exit 2, naming the
source) when any changed: resuming on other data would silently break the exact-resume guarantee. Package
version differences are only logged, because a fixed bug in a library must not block a resume.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from integration_training.errors import UserError

logger = logging.getLogger(__name__)

FILE = "environment.json"
ROOT = Path(__file__).resolve().parents[1]


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=False)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None  # not a git checkout (an installed wheel) or no git: the version still says what ran
    if done.returncode != 0:
        return None
    return done.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _version(module: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def environment(seed: int) -> dict[str, Any]:
    import torch

    from integration_training.template import FIXED_DATE_STRING

    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "project": {"version": _version("integration-training") or _version("integration_training"),
                    "commit": _git_commit()},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in ("torch", "transformers", "datasets", "tokenizers", "numpy")},
        "cuda": torch.version.cuda,
        "devices": devices or [platform.processor() or platform.machine()],
        "seed": seed,
        "template_date": FIXED_DATE_STRING,
    }


def read(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _write(run_dir: Path, record: dict[str, Any]) -> None:
    path = Path(run_dir) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{FILE}.tmp-{os.getpid()}")
    staging.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    with staging.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(staging, path)


def record_stage(run_dir: Path, stage: str, seed: int, fingerprints: dict[str, Any], resume: bool,
                 source_paths: dict[str, str], is_main: bool) -> None:
    """On a fresh start write the stage's fingerprints; on resume check them against the recorded ones.

    `fingerprints`: {"sources": {label: sha256}, "tokenizer_sha256": ..., "chat_template_sha256": ..., ...}.
    `source_paths`: label → file path for local sources, named in the refusal so the user knows what changed.
    """
    record = read(run_dir)
    recorded = (record or {}).get("stages", {}).get(stage)
    if resume and recorded is not None:
        _check_unchanged(stage, recorded, fingerprints, source_paths)
        _log_version_changes(record or {}, environment(seed))
        return
    if not is_main:
        return
    record = record or environment(seed)
    record.setdefault("stages", {})[stage] = fingerprints
    _write(run_dir, record)


def local_paths(specs) -> dict[str, str]:
    """Source label → absolute file path of the local sources among `specs` (named when a resume is refused)."""
    from integration_training.data import source_label

    return {source_label(s): str(Path(s.path).expanduser().resolve()) for s in specs if s.path is not None}


def data_fingerprints(tokenizer: Any, train, held_out, max_length: int) -> dict[str, Any]:
    """What a stage trains on: per-source row hashes (training and held-out examples), tokenizer, template."""
    from integration_training.data.prepared import source_fingerprints, tokenizer_fingerprint

    return {"sources": source_fingerprints(train), "val_sources": source_fingerprints(held_out),
            "max_length": max_length, **tokenizer_fingerprint(tokenizer)}


def _check_unchanged(stage: str, recorded: dict[str, Any], now: dict[str, Any], paths: dict[str, str]) -> None:
    for group in ("sources", "val_sources"):
        before, after = recorded.get(group, {}), now.get(group, {})
        for label in sorted(set(before) | set(after)):
            if before.get(label) != after.get(label):
                where = f" ({paths[label]})" if label in paths else ""
                state = "is new" if label not in before else "is gone" if label not in after else "changed"
                raise UserError(
                    f"--resume: {stage} data source {label}{where} {state} since this run started (sha256 of its "
                    f"rows {before.get(label, '-')[:12]} → {after.get(label, '-')[:12]}); resuming would continue "
                    "on other data. Restore the original rows, or start a new output.experiment_name"
                )
    for key in ("tokenizer_sha256", "chat_template_sha256", "max_length"):
        if recorded.get(key) != now.get(key):
            raise UserError(
                f"--resume: the {stage} {key.removesuffix('_sha256').replace('_', ' ')} changed since this run "
                f"started ({recorded.get(key)} → {now.get(key)}), so the tokens differ; restore it or start a new "
                "output.experiment_name"
            )


def _log_version_changes(recorded: dict[str, Any], now: dict[str, Any]) -> None:
    for key in ("python", "cuda"):
        if recorded.get(key) != now.get(key):
            logger.warning("resume: %s was %s when the run started, now %s", key, recorded.get(key), now.get(key))
    for name, version in now["packages"].items():
        if recorded.get("packages", {}).get(name) != version:
            logger.warning("resume: %s was %s when the run started, now %s", name,
                           recorded.get("packages", {}).get(name), version)
