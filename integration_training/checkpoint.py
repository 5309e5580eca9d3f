"""Atomic checkpoints: `stage_dir/step_NNNNNN/` = HF `save_pretrained` model + tokenizer + `train_state.pt`.

A checkpoint is written under a hidden temp name in the same directory and `os.replace`d into place, so a crash
mid-write never leaves a directory that looks complete. "Latest" is the highest step *number* (step_1000000 sorts
before step_999999 by name).

`train_state.pt` holds only tensors and plain Python containers so that it loads with `weights_only=True`
(no arbitrary unpickling of files a user may have copied from elsewhere).
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from integration_training.errors import UserError

TRAIN_STATE = "train_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    assert step >= 0, f"checkpoint step must be >= 0, got {step}"
    return f"step_{step:06d}"


def checkpoint_step(path: Path) -> int:
    """The step number encoded in a `step_NNNNNN` directory name."""
    match = _STEP_DIR.match(Path(path).name)
    if match is None:
        raise UserError(f"{path}: not a checkpoint directory (expected a name like step_000010)")
    return int(match.group(1))


def save_checkpoint(
    stage_dir: Path, step: int, model, tokenizer, train_state: dict[str, Any], *, state_dict: dict | None, dtype: str
) -> Path:
    """Write model, tokenizer and train state for `step`; return the final directory.

    Call on the main rank only. Re-saving an existing step (a resumed run reaching the same step) replaces it.
    `state_dict`: the model weights to write instead of `model`'s own (FSDP2 gathers full weights first), or None.
    `dtype`: the compute dtype. The HF weights are written in it (what consumers load); when it is not float32 the
    float32 master weights go beside them (`precision.MASTER_FILE`) for exact resume and the SFT→RL hand-off.
    Every file is fsync'ed before the rename, so after a power loss the renamed directory is complete. A full disk
    (or quota) is a UserError naming the path; the partial staging directory is removed and older checkpoints stay.
    """
    from integration_training import precision

    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(stage_dir)
    final = stage_dir / step_dir_name(step)
    staging = stage_dir / f".tmp-{final.name}-{os.getpid()}"
    try:
        staging.mkdir()
        weights = state_dict if state_dict is not None else model.state_dict()
        if precision.is_mixed(dtype):
            model.save_pretrained(str(staging), state_dict=precision.consumer_state_dict(weights, dtype))
            precision.record_dtype(staging, dtype)
            precision.save_masters(weights, staging)
        else:
            model.save_pretrained(str(staging), state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        torch.save(train_state, staging / TRAIN_STATE)
        _fsync_tree(staging)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"{stage_dir}: no space left on device while writing checkpoint {final.name}; the partial copy was "
                "removed and earlier checkpoints are intact — free space (or move output.save_dir), then --resume"
            ) from None
        raise
    if final.exists():
        # os.replace cannot replace a non-empty directory; move the old one aside first, then drop it.
        stale = stage_dir / f".old-{final.name}-{os.getpid()}"
        os.replace(final, stale)
        os.replace(staging, final)
        shutil.rmtree(stale)
    else:
        os.replace(staging, final)
    _fsync_directory(stage_dir)
    return final


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for directory in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def clean_stale_staging(stage_dir: Path) -> list[Path]:
    """Remove what a crashed save left behind (`.tmp-*` staging dirs); put back an `.old-*` whose replacement
    never landed. Call on the main rank while it holds the run lock (no other save can be in flight)."""
    stage_dir = Path(stage_dir)
    removed = []
    if not stage_dir.is_dir():
        return removed
    for leftover in sorted(stage_dir.iterdir()):
        name = leftover.name
        if name.startswith(".old-") and leftover.is_dir():
            step_name = name.removeprefix(".old-").rsplit("-", 1)[0]
            if not (stage_dir / step_name).exists():  # crashed between the two renames: the old copy is the good one
                os.replace(leftover, stage_dir / step_name)
                continue
        if name.startswith((".tmp-", ".old-")):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()
            removed.append(leftover)
    return removed


def verify_checkpoint(path: Path) -> None:
    """Cheap integrity check of a checkpoint before a resume loads it: every weights file's safetensors header
    and size, and the train state's zip structure and CRCs. A damaged checkpoint is a UserError naming it."""
    import json
    import zipfile

    path = Path(path)
    fix = f"delete {path} to resume from the checkpoint before it"
    weights = sorted(path.rglob("*.safetensors"))  # rglob: a LoRA checkpoint keeps its adapter in adapter/
    if not weights:
        raise UserError(f"{path}: holds no *.safetensors weights; {fix}")
    for file in weights:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            head = handle.read(8)
            header_size = int.from_bytes(head, "little") if len(head) == 8 else -1
            try:
                if not 0 < header_size <= size - 8:
                    raise ValueError("bad header size")
                header = json.loads(handle.read(header_size))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError):
                raise UserError(f"{file}: damaged weights file (unreadable safetensors header); {fix}") from None
        if 8 + header_size + end != size:
            raise UserError(f"{file}: damaged weights file (size {size} bytes, header says {8 + header_size + end}); {fix}")
    state = path / TRAIN_STATE
    try:
        with zipfile.ZipFile(state) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile) as error:
        raise UserError(f"{state}: damaged train state ({error}); {fix}") from None
    if bad is not None:
        raise UserError(f"{state}: damaged train state (entry {bad} fails its CRC); {fix}")


def list_checkpoints(stage_dir: Path) -> list[Path]:
    """Complete checkpoints (those with a train state), ordered by step number."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return []
    found = [p for p in stage_dir.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / TRAIN_STATE).is_file()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(stage_dir: Path) -> Path | None:
    """The checkpoint with the highest step number, or None."""
    found = list_checkpoints(stage_dir)
    return found[-1] if found else None


def load_train_state(path: Path) -> dict[str, Any]:
    """Load `train_state.pt` from a checkpoint directory (or the file itself)."""
    path = Path(path)
    file = path / TRAIN_STATE if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{file}: missing; this checkpoint is incomplete — delete it or resume from an earlier one")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: the user can delete it
        raise UserError(f"{file}: cannot be read ({error}); delete this checkpoint to resume from an earlier one") from error


def capture_rng_state() -> dict[str, Any]:
    """Every RNG training may touch (python, numpy, torch CPU, CUDA), in weights_only-loadable form."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(np.asarray(keys).copy()), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
