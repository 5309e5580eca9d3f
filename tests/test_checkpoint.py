"""Atomic checkpoints, latest-by-step-number, train state and RNG round trips."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from helpers import tiny_model
from integration_training.checkpoint import (
    capture_rng_state,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    load_train_state,
    restore_rng_state,
    save_checkpoint,
    step_dir_name,
)
from integration_training.errors import UserError


def fake_checkpoint(stage_dir, name, complete=True):
    path = stage_dir / name
    path.mkdir(parents=True)
    if complete:
        torch.save({"step": 0}, path / "train_state.pt")
    return path


def test_latest_is_by_step_number_not_name(tmp_path):
    for name in ("step_000009", "step_000010", "step_1000000", "step_999999"):
        fake_checkpoint(tmp_path, name)
    fake_checkpoint(tmp_path, "step_2000000", complete=False)  # no train state: a crash mid-write elsewhere
    fake_checkpoint(tmp_path, ".tmp-step_3000000-123")  # staging dir
    (tmp_path / "notes").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_1000000"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000009", "step_000010", "step_999999", "step_1000000"]
    assert latest_checkpoint(tmp_path / "missing") is None
    assert step_dir_name(10) == "step_000010" and checkpoint_step(tmp_path / "step_000010") == 10


def test_save_is_atomic_and_resave_replaces(tmp_path):
    model = tiny_model(61, 0)
    path = save_checkpoint(tmp_path, 3, model, None, {"step": 3}, state_dict=None, dtype="float32")
    assert path == tmp_path / "step_000003"
    assert {"config.json", "model.safetensors", "train_state.pt"} <= {p.name for p in path.iterdir()}
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    again = save_checkpoint(tmp_path, 3, model, None, {"step": 33}, state_dict=None, dtype="float32")
    assert again == path and load_train_state(path)["step"] == 33
    assert [p.name for p in tmp_path.iterdir()] == ["step_000003"]  # no staging or stale dirs left behind


def test_missing_or_corrupt_train_state_is_a_user_error(tmp_path):
    (tmp_path / "step_000001").mkdir()
    with pytest.raises(UserError, match="train_state.pt"):
        load_train_state(tmp_path / "step_000001")
    (tmp_path / "step_000001" / "train_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read"):
        load_train_state(tmp_path / "step_000001")


def test_rng_state_round_trips_through_a_saved_file(tmp_path):
    state = capture_rng_state()
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    torch.save({"rng": state}, tmp_path / "train_state.pt")
    random.random(), np.random.rand(), torch.rand(7)  # move every generator on
    restore_rng_state(load_train_state(tmp_path)["rng"])  # weights_only load
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])
